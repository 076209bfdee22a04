"""Per-image transforms between a decoded sample and the model: the paired augmentation draw (one dihedral move
and one colour map for both images of a KD pair) and standardisation with the manifest's statistics.

Geometry is one PIL transpose of the uint8 image; all of the colour jitter plus standardisation is ONE affine map
of RGB (brightness, contrast, saturation and a YIQ hue rotation are each affine, so is their composition) and one
clamp: a (3, 6) array per image, applied by `finish_batch` with one batched matmul, in the loader or on the
training device. Speed: bench/bench_loader.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from hpcdistill.config import AugmentConfig


def _dihedral_ops() -> dict[tuple[bool, bool, int], Image.Transpose | None]:
    """(hflip, vflip, rot90 k) -> the one PIL transpose doing all three (flip left-right, then top-bottom, then
    np.rot90 k times, counter-clockwise); found by probing, so the table cannot disagree with the numpy meaning."""
    probe = np.arange(6, dtype=np.uint8).reshape(2, 3)
    ops: list[Image.Transpose | None] = [None, *Image.Transpose]
    table = {}
    for hflip in (False, True):
        for vflip in (False, True):
            for k in range(4):
                want = np.rot90(probe[:: -1 if vflip else 1, :: -1 if hflip else 1], k)
                for op in ops:
                    got = probe if op is None else np.asarray(Image.fromarray(probe).transpose(op))
                    if got.shape == want.shape and np.array_equal(got, want):
                        table[(hflip, vflip, k)] = op
                        break
    return table


_DIHEDRAL = _dihedral_ops()
_GREY = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL's "L"
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
# H0, H1, H2 (hue rotation = H0 + cos H1 + sin H2 in RGB) and 1 g^T (x -> grey(x) in every channel)
_COLOUR_BASIS = np.stack([_YIQ_TO_RGB @ np.diag([1.0, 0.0, 0.0]) @ _RGB_TO_YIQ,
                          _YIQ_TO_RGB @ np.diag([0.0, 1.0, 1.0]) @ _RGB_TO_YIQ,
                          _YIQ_TO_RGB @ np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]) @ _RGB_TO_YIQ,
                          np.outer(np.ones(3), _GREY)]).reshape(4, 9)


@dataclass(frozen=True)
class AugmentDraw:
    """One random draw, applied identically to every image of a sample (the KD pair)."""

    hflip: bool
    vflip: bool
    rot90: int
    brightness: float
    contrast: float
    saturation: float
    hue: float

    @staticmethod
    def sample(aug: AugmentConfig, rng: random.Random) -> AugmentDraw:
        jitter = lambda s: rng.uniform(1 - s, 1 + s) if s > 0 else 1.0  # noqa: E731
        return AugmentDraw(
            hflip=aug.flips and rng.random() < 0.5,
            vflip=aug.flips and rng.random() < 0.5,
            rot90=rng.randrange(4) if aug.rot90 else 0,
            brightness=jitter(aug.brightness),
            contrast=jitter(aug.contrast),
            saturation=jitter(aug.saturation),
            hue=rng.uniform(-aug.hue, aug.hue) if aug.hue > 0 else 0.0,
        )

    def geometry(self, img: Image.Image) -> Image.Image:
        """Flips then rotation: exact pixel moves, the same k on both images keeps non-square pairs consistent."""
        op = _DIHEDRAL[(self.hflip, self.vflip, self.rot90)]
        return img if op is None else img.transpose(op)

    def colour(self, mean_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) with jittered = A @ rgb + b on [0, 1]: brightness, contrast, saturation, hue in that order.
        Contrast pulls towards the mean grey of the image whose channel means are `mean_rgb`; the caller passes
        the same means for both images of a pair, so both get exactly the same map. Clamping to [0, 1] happens
        once, after the whole map (per-step clamps would differ only for pixels pushed out of range midway)."""
        # brightness x -> B x; contrast x -> C x + (1 - C) * grey(B mean); saturation S = s I + (1 - s) 1 g^T;
        # hue H = a rotation of the YIQ chroma plane (luminance kept; ~10x cheaper than an HSV round trip).
        # H 1 = S 1 = 1 and H 1 g^T = 1 g^T, so A = C B (s H + (1 - s) 1 g^T), H = H0 + cos H1 + sin H2, b ~ 1.
        turn = 2 * math.pi * self.hue
        scale = self.contrast * self.brightness
        coef = np.array([scale * self.saturation, scale * self.saturation * math.cos(turn),
                         scale * self.saturation * math.sin(turn), scale * (1 - self.saturation)])
        offset = (1 - self.contrast) * self.brightness * float(_GREY @ mean_rgb)
        return (coef @ _COLOUR_BASIS).reshape(3, 3), np.full(3, offset)


def uint8_planes(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W). PIL packs one band per call in C: cheaper than an interleaved-to-planar
    transpose in numpy or torch (which would otherwise fall to finish_batch on a CPU)."""
    w, h = img.size
    bands = [np.frombuffer(img.tobytes("raw", band), dtype=np.uint8) for band in "RGB"]
    return torch.from_numpy(np.stack(bands).reshape(3, h, w))


class Standardizer:
    """The per-image colour map as a (3, 6) float32 array [A | b | low | high]: standardised = clamp(A @ rgb + b,
    low, high) with rgb the raw 0..255 values. A and b fold the jitter map (on [0, 1]), /255 and (x - mean) / std;
    low/high are the jittered image's [0, 1] clamp in standardised units."""

    def __init__(self, stats: dict[str, list[float]]):
        mean, std = np.asarray(stats["mean"], dtype=np.float64), np.asarray(stats["std"], dtype=np.float64)
        self.degenerate = bool((std == 0).any())  # std 0 makes non-finite inputs; the engine names the step
        with np.errstate(divide="ignore", invalid="ignore"):
            self.scale, self.offset = 1.0 / std, -mean / std
            self.bounds = np.stack([-mean / std, (1.0 - mean) / std], axis=1)
        self.plain = self.map(np.eye(3), np.zeros(3))

    def map(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.empty((3, 6), np.float32)
        with np.errstate(invalid="ignore" if self.degenerate else "warn"):
            out[:, :3] = a * (self.scale / 255.0)[:, None]
            out[:, 3] = b * self.scale + self.offset
        out[:, 4:] = self.bounds
        return out


def finish_batch(batch: dict[str, Any], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """uint8 images + colour maps -> standardised `dtype` images on `device`: one batched matmul and a clamp.
    Run it where the batch lands (the GPU, in training) so loader workers only decode, flip and rotate; a batch that
    is already finished passes through unchanged."""
    out = dict(batch)
    for slot in ("x", "t"):
        maps = out.pop(f"{slot}_map", None)
        if maps is None:
            continue
        images = out[slot].to(device, non_blocking=True)
        n, c, h, w = images.shape
        maps = maps.to(device, torch.float32, non_blocking=True)
        y = torch.baddbmm(maps[:, :, 3:4], maps[:, :, :3], images.reshape(n, c, h * w).float())
        if y.device.type == "cpu":  # scalar-bound clamps are the fast CPU kernel
            bounds = maps[:, :, 4:].tolist()
            for i, j in np.ndindex(n, c):
                y[i, j].clamp_(*bounds[i][j])
        else:
            y = torch.clamp(y, maps[:, :, 4:5], maps[:, :, 5:6])
        out[slot] = y.view(n, c, h, w).to(dtype)
    return out
