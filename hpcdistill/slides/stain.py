"""Stain normalisation: every window of a slide mapped to a reference stain before the model sees it, so slides from
several staining runs or hospitals reach it alike. Two published methods, fitted by torchstain (numpy backend):
Macenko (each stain's optical-density vector and its 99th-percentile amount, separated in OD space) and Reinhard (the
mean and spread of each CIE L*a*b* channel). A slide is fitted once, on its thumbnail's tissue pixels, and each of its
windows mapped with that fit, so a window's colours never depend on what else is in it. `shard` writes the
normalised pixels and records the method, its reference and each slide's fit; a model carries its shards' record,
and `evaluate`, `predict` and distillation refuse a model whose record differs from theirs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcdistill.common.errors import SlideError

STAIN_METHODS = ("none", "macenko", "reinhard")
MACENKO_IO = 240  # the transmitted light intensity Macenko's optical density is measured against (torchstain's)
STAINED_OD = 0.15  # a pixel whose optical density is below this in every channel is glass (Macenko's beta)
MIN_TISSUE_PIXELS = 500  # thumbnail tissue pixels a slide's fit needs (fewer: a blank or tiny slide)
REFERENCE_MAX_PIXELS = 4096 * 4096  # a reference image larger than this is refused (it is a tile, not a slide)


@dataclass(frozen=True)
class StainNorm:
    """`method` ("none", "macenko", "reinhard") and the reference it maps to: Macenko's 3x2 stain matrix and 2
    maximum amounts (6 + 2 values), or Reinhard's L*a*b* means and standard deviations (3 + 3)."""

    method: str = "none"
    reference: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in STAIN_METHODS:
            raise SlideError(f"stain normalisation {self.method!r}: expected one of {', '.join(STAIN_METHODS)}")
        sizes = {"none": 0, "macenko": 8, "reinhard": 6}
        values = tuple(float(v) for v in self.reference)
        if len(values) != sizes[self.method] or not all(math.isfinite(v) for v in values):
            raise SlideError(
                f"stain normalisation {self.method}: its reference needs {sizes[self.method]} finite values"
            )
        object.__setattr__(self, "reference", tuple(round(v, 6) for v in values))  # one form in every record

    @property
    def active(self) -> bool:
        return self.method != "none"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "reference": list(self.reference)}

    @classmethod
    def from_dict(cls, record: Any, where: str) -> StainNorm:
        """The normalisation a manifest or export recorded; one written before the option (None): none."""
        if record is None:
            return cls()
        if not isinstance(record, dict) or set(record) != {"method", "reference"}:
            raise SlideError(f"{where}: stain_norm {record!r}: expected {{method, reference}}")
        return cls(str(record["method"]), tuple(record["reference"]))

    @classmethod
    def fitted(cls, method: str, reference_image: str | Path | None) -> StainNorm:
        """The method with its reference: fitted on `reference_image` (a tile of the stain wanted), or Macenko's
        published reference when none is given; Reinhard needs an image."""
        if method == "none":
            return cls()
        if reference_image is None and method == "reinhard":
            raise SlideError("--stain-norm reinhard: needs --stain-reference, an image of the stain to map to")
        pixels = None if reference_image is None else _reference_pixels(Path(reference_image))
        return cls(method, _fit(method, pixels, str(reference_image or "reference")))

    def describe(self) -> str:
        return "none" if not self.active else f"{self.method} to {list(self.to_dict()['reference'])}"

    def fit_slide(self, thumb: np.ndarray, mask: np.ndarray, slide: str) -> tuple[float, ...]:
        """The slide's own values (as the reference's), fitted on its thumbnail's tissue pixels."""
        tissue = thumb[..., :3][mask]
        if tissue.shape[0] < MIN_TISSUE_PIXELS:
            raise SlideError(
                f"{slide}: {tissue.shape[0]} tissue pixels on the thumbnail: too few to fit its stain "
                f"({MIN_TISSUE_PIXELS} needed for --stain-norm {self.method})"
            )
        return _fit(self.method, tissue, slide)

    def apply(self, pixels: np.ndarray, fit: tuple[float, ...]) -> np.ndarray:
        """(H, W, 3) uint8 of a slide fitted as `fit` -> the same pixels in the reference's stain, uint8."""
        if not self.active:
            return pixels
        flat = pixels.reshape(-1, 3)
        out = _macenko(flat, fit, self.reference) if self.method == "macenko" else _reinhard(flat, fit, self.reference)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(pixels.shape)


def _reference_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise SlideError(f"--stain-reference {path}: no such file")
    try:
        with Image.open(path) as image:
            if image.width * image.height > REFERENCE_MAX_PIXELS:
                raise SlideError(
                    f"--stain-reference {path}: {image.width}x{image.height} px; give a tile (up to 4096 px square)"
                )
            return np.asarray(image.convert("RGB")).reshape(-1, 3)
    except SlideError:
        raise
    except Exception as err:  # noqa: BLE001 -- PIL raises many types for what is not an image
        raise SlideError(f"--stain-reference {path}: not a readable image ({type(err).__name__})") from None


def _fit(method: str, pixels: np.ndarray | None, what: str) -> tuple[float, ...]:
    """torchstain's fit of `pixels` ((n, 3) uint8; None: the method's published reference), as a flat tuple."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

    try:
        if method == "macenko":
            normaliser = NumpyMacenkoNormalizer()
            if pixels is not None:
                normaliser.fit(pixels.reshape(-1, 1, 3), Io=MACENKO_IO)
            values = (*np.asarray(normaliser.HERef).ravel(), *np.asarray(normaliser.maxCRef).ravel())
        else:
            normaliser = NumpyReinhardNormalizer()
            normaliser.fit(_stained(pixels).reshape(-1, 1, 3))
            values = (*np.asarray(normaliser.target_means).ravel(), *np.asarray(normaliser.target_stds).ravel())
    except (ValueError, IndexError, np.linalg.LinAlgError) as err:
        raise SlideError(f"{what}: its stain cannot be fitted ({method}: {err})") from None
    if not all(math.isfinite(float(v)) for v in values):
        raise SlideError(f"{what}: its stain cannot be fitted ({method}: a non-finite value; too little tissue?)")
    return tuple(float(v) for v in values)


def _density(pixels: np.ndarray) -> np.ndarray:
    """(n,) each pixel's largest optical density over R, G and B (0 for glass)."""
    return -np.log((pixels.astype(np.float64).min(axis=1) + 1.0) / MACENKO_IO)


def _stained(pixels: np.ndarray) -> np.ndarray:
    """The pixels holding stain (optical density at least STAINED_OD in some channel: a test blind to the stain's
    hue, so a site's pinker or bluer stain does not change which pixels count), so Reinhard's statistics of a
    reference tile and of a slide's tissue describe the same thing."""
    kept = pixels[_density(pixels) >= STAINED_OD]
    if kept.shape[0] < MIN_TISSUE_PIXELS:
        raise ValueError(f"{kept.shape[0]} stained pixels; {MIN_TISSUE_PIXELS} needed")
    return kept


def _macenko(flat: np.ndarray, fit: tuple[float, ...], reference: tuple[float, ...]) -> np.ndarray:
    """Each pixel's stain amounts under the slide's stain matrix, rescaled by the maximum amounts and recomposed with
    the reference's (Macenko et al. 2009, as torchstain's normalize, with the slide's fit instead of the window's)."""
    stains, top = np.asarray(fit[:6]).reshape(3, 2), np.asarray(fit[6:])
    ref_stains, ref_top = np.asarray(reference[:6]).reshape(3, 2), np.asarray(reference[6:])
    density = -np.log((flat.astype(np.float64) + 1.0) / MACENKO_IO)
    amounts = np.linalg.pinv(stains) @ density.T  # least squares, as torchstain's lstsq, for all pixels at once
    amounts *= (ref_top / top)[:, None]
    return (MACENKO_IO * np.exp(-ref_stains @ amounts)).T


def _reinhard(flat: np.ndarray, fit: tuple[float, ...], reference: tuple[float, ...]) -> np.ndarray:
    """Each L*a*b* channel standardised with the slide's mean and spread, then given the reference's (Reinhard et
    al. 2001, through torchstain's colour conversions), on the stained pixels; glass is left as it is."""
    from torchstain.numpy.utils.lab2rgb import lab2rgb
    from torchstain.numpy.utils.rgb2lab import rgb2lab

    packed = np.array([2.55, 1.0, 1.0]), np.array([0.0, 128.0, 128.0])  # torchstain's (OpenCV's) L*a*b* packing
    lab = rgb2lab(flat.reshape(-1, 1, 3).astype(np.float32) / 255.0).reshape(-1, 3).astype(np.float64)
    lab = (lab - packed[1]) / packed[0]  # true L*a*b*, the units its fit's means and spreads are in
    mean, std = np.asarray(fit[:3]), np.maximum(np.asarray(fit[3:]), 1e-6)
    lab = (lab - mean) / std * np.asarray(reference[3:]) + np.asarray(reference[:3])
    mapped = lab2rgb((lab * packed[0] + packed[1]).reshape(-1, 1, 3).astype(np.float32)).reshape(-1, 3) * 255.0
    # The statistics are the tissue's: glass, far outside them, would be tinted. It is kept, and the map faded in
    # between half and one and a half times the stained optical density, so no edge appears at the tissue's border.
    weight = np.clip((_density(flat) - 0.5 * STAINED_OD) / STAINED_OD, 0.0, 1.0)[:, None]
    return weight * mapped + (1.0 - weight) * flat


def stain_mismatch(model: StainNorm, data: StainNorm, data_name: str) -> str | None:
    """Why a model trained with `model`'s normalisation cannot read data normalised as `data` (None: it can)."""
    if model == data:
        return None
    return (
        f"trained on shards with stain normalisation {model.describe()}, but {data_name} has {data.describe()}: the "
        "model would see colours it was not trained on; shard them with the model's --stain-norm (and reference)"
    )
