"""From a loader batch to the model's input, where the model runs: JPEG decoding when the loader shipped the bytes
(`data.decode: gpu`), the paired flips/rot90, stacking (with the bucket crop), the colour map's contrast pivot and
standardisation, as one batched matmul and a clamp.

The loader's workers only read and decode (or only read, with `data.decode: gpu`): every per-pixel step after the
decode runs here, on the training device, so a CPU core feeds the GPU at close to bare JPEG-decode speed.

A loader batch ("loose": per-sample images, not yet stacked) holds, for n samples:
    key, slide: lists; y: (n,) int64
    x (and t in distillation): n uint8 images, each (H, W, 3) decoded or (bytes,) JPEG when `encoded`
    x_map, t_map: (n, 3, 6) float32 colour maps [A | b | low | high] without the contrast pivot (augment.Standardizer)
    x_pivot, t_pivot: (n, 3) float64: b += pivot * the mean grey level of the model image x, on [0, 1]
    x_hed, t_hed: (n, 3, 4) float32 stain maps (augment.AugmentDraw.stain_map), with `augment.hed` only
    moves: (n, 3) int64 (hflip, vflip, rot90 k) when augmenting; encoded, crop: bools
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from hpcdistill.common.errors import DataError, TrainError, one_line
from hpcdistill.data.augment import GREY, apply_moves
from hpcdistill.shards.reader import decode_image

JpegDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def nvjpeg_decoder() -> JpegDecoder:
    """torchvision's batched nvJPEG decode; a one-line TrainError when torchvision is absent or cannot load (a wheel
    built for another torch or CUDA raises at import)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as err:  # noqa: BLE001 -- ImportError, or RuntimeError/OSError from a mismatched build
        raise TrainError(
            f"data.decode: gpu needs torchvision built for this torch and CUDA "
            f"(pip install 'hpcdistill[gpu]'); importing it failed: {one_line(err, 160)}"
        ) from None

    def decode(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))

    return decode


def require_device_decode(device: torch.device) -> None:
    """`data.decode: gpu` is refused, not quietly replaced, where it cannot run."""
    if device.type != "cuda":
        raise TrainError(
            f"data.decode: gpu decodes JPEGs with nvJPEG on the training GPU, but this run trains on "
            f"{device.type}; set data.decode=cpu"
        )
    nvjpeg_decoder()


def decoded(batch: dict[str, Any], slot: str, device: torch.device) -> list[torch.Tensor]:
    """The slot's images as uint8 (3, H, W) on `device`: decoded there (nvJPEG on a GPU, PIL on a CPU) when the loader
    shipped bytes, else copied there as decoded."""
    images = batch[slot]
    if not batch.get("encoded"):
        return [img.to(device, non_blocking=True).permute(2, 0, 1) for img in images]
    if device.type != "cuda":  # CPU runs of the encoded path (tests, bench --quick): the loader's own decode
        return [decode_image(blob.numpy()).permute(2, 0, 1) for blob in images]
    try:
        return nvjpeg_decoder()(list(images), device)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as err:  # the loader checked the markers: a JPEG nvJPEG refuses is damaged or unusual
        raise DataError(
            f"{', '.join(batch['key'])}: its {slot} images cannot be decoded on {device} "
            f"({one_line(err, 200)}); check the shard, or train with data.decode=cpu"
        ) from None


def center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


def stacked(
    xs: list[torch.Tensor], ts: list[torch.Tensor] | None, crop: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, 3, H, W) stacks of the model images and the teacher images. With `crop` (bucketed mode) every image is
    centre-cropped to the batch's smallest size; the teacher crop is the student crop scaled by the magnification
    ratio, so pairs stay aligned."""
    if crop and len(xs) > 1:
        h, w = min(x.shape[-2] for x in xs), min(x.shape[-1] for x in xs)
        if ts is not None:
            ratios = [(t.shape[-2] / x.shape[-2], t.shape[-1] / x.shape[-1]) for x, t in zip(xs, ts)]
            th, tw = min(round(h * r[0]) for r in ratios), min(round(w * r[1]) for r in ratios)
            ts = [center_crop(t, th, tw) for t in ts]
        xs = [center_crop(x, h, w) for x in xs]
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise DataError(
            f"data: micro-batch of {len(xs)} has different image sizes {sorted(shapes)}; "
            "use train.micro_batch=1 for whole tissues or train.bucketed=true"
        )
    return torch.stack(xs), None if ts is None else torch.stack(ts)


def mean_grey(images: torch.Tensor) -> torch.Tensor:
    """(n,) float64 mean ITU-R 601 grey level of (n, 3, H, W) images on the 0..255 scale, on [0, 1]: exact integer
    sums for uint8, float64 sums for stain-moved float images."""
    n, c, h, w = images.shape
    exact = images.dtype == torch.uint8
    total = images.sum((2, 3), dtype=torch.int64 if exact else torch.float64)
    means = total.double() / (h * w * 255.0)
    return means[:, 0] * GREY[0] + means[:, 1] * GREY[1] + means[:, 2] * GREY[2]  # scalars: no copy to the device


def stain_moved(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> float32 on the same 0..255 scale, each pixel's optical density od = -log((v + 1) / 256)
    mapped to L @ od + c by its image's (3, 4) stain map [L | c] (augment.AugmentDraw.stain_map); an identity map
    gives the image back to float rounding."""
    n, c, h, w = images.shape
    density = torch.log((images.reshape(n, c, h * w).float() + 1.0) / 256.0).neg_()
    moved = torch.baddbmm(maps[:, :, 3:4], maps[:, :, :3], density)
    return moved.neg_().exp_().mul_(256.0).sub_(1.0).clamp_(0.0, 255.0).view(n, c, h, w)


def standardised(images: torch.Tensor, maps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """clamp(A @ rgb + b, low, high) per image: one batched matmul."""
    n, c, h, w = images.shape
    y = torch.baddbmm(maps[:, :, 3:4], maps[:, :, :3], images.reshape(n, c, h * w).float())
    if y.device.type == "cpu":  # scalar-bound clamps are the fast CPU kernel
        bounds = maps[:, :, 4:].tolist()
        for i, j in np.ndindex(n, c):
            y[i, j].clamp_(*bounds[i][j])
    else:
        y = torch.clamp(y, maps[:, :, 4:5], maps[:, :, 5:6])
    return y.view(n, c, h, w).to(dtype)


def finish_batch(
    batch: dict[str, Any], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """A loader batch -> standardised `dtype` images (n, 3, H, W) on `device`, with key, slide and y. Run it where
    the batch lands (the GPU, in training); a batch that is already finished passes through unchanged."""
    if "x_map" not in batch:
        return batch
    device = torch.device(device)
    images = {slot: decoded(batch, slot, device) for slot in ("x", "t") if slot in batch}
    if "moves" in batch:
        for slot in images:
            images[slot] = [apply_moves(img, *move) for img, move in zip(images[slot], batch["moves"].tolist())]
    x, t = stacked(images["x"], images.get("t"), bool(batch.get("crop")))
    if "x_hed" in batch:  # the stain jitter, before the colour map (and the grey level contrast pivots on)
        x = stain_moved(x, batch["x_hed"].to(device, non_blocking=True))
        t = None if t is None else stain_moved(t, batch["t_hed"].to(device, non_blocking=True))
    grey = mean_grey(x) if "x_pivot" in batch else None  # the model image's grey level pivots contrast for both
    out = {k: batch[k] for k in ("key", "slide", "tissue", "area", "y") if k in batch}
    for slot, slot_images in (("x", x), ("t", t)):
        if slot_images is None:
            continue
        maps = batch[f"{slot}_map"].to(device, torch.float64, non_blocking=True)
        if grey is not None:
            maps[:, :, 3] += batch[f"{slot}_pivot"].to(device, torch.float64, non_blocking=True) * grey[:, None]
        out[slot] = standardised(slot_images, maps.float(), dtype)
    return out
