"""Per-image transforms between a decoded sample and the model: the paired augmentation draw (one dihedral move
and one colour map for both images of a KD pair) and standardisation with the manifest's statistics.

Geometry is flips then rot90, exact pixel moves done where the batch lands (device_batch.py); all of the colour
jitter plus standardisation is ONE affine map of RGB (brightness, contrast, saturation and a YIQ hue rotation are
each affine, so is their composition) and one clamp: a (3, 6) array per image. Only its offset depends on the image
(contrast pulls towards the image's mean grey), so the loader draws the map and the device adds that term
(`Standardizer.pivot`), after decoding. The stain jitter (`augment.hed`: each of haematoxylin, eosin and DAB scaled
and shifted in optical density) is affine in optical density, not in RGB, so it is its own (3, 4) map, applied there
first (a log, a 3x3 map and an exp per pixel); the pair shares it like every other move. Speed: bench/bench_loader.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from hpcdistill.config.schema import AugmentConfig

GREY = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL's "L"
# Each stain's optical density per unit amount, in R, G, B (Ruifrok and Johnston's haematoxylin, eosin and DAB, as
# scikit-image's rgb_from_hed); a row-vector image's OD is its stain amounts @ this.
_HED_TO_OD = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_TO_OD = _HED_TO_OD / np.linalg.norm(_HED_TO_OD, axis=1, keepdims=True)
_OD_TO_HED = np.linalg.inv(_HED_TO_OD)  # once: a draw per sample only scales its rows
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
# H0, H1, H2 (hue rotation = H0 + cos H1 + sin H2 in RGB) and 1 g^T (x -> grey(x) in every channel)
_COLOUR_BASIS = np.stack(
    [
        _YIQ_TO_RGB @ np.diag([1.0, 0.0, 0.0]) @ _RGB_TO_YIQ,
        _YIQ_TO_RGB @ np.diag([0.0, 1.0, 1.0]) @ _RGB_TO_YIQ,
        _YIQ_TO_RGB @ np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]) @ _RGB_TO_YIQ,
        np.outer(np.ones(3), GREY),
    ]
).reshape(4, 9)


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
    hed_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # each stain's amount times this ...
    hed_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)  # ... plus this (optical density units)

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
            **(_stain_draw(aug.hed, rng) if aug.hed > 0 else {}),
        )

    def stain_map(self) -> np.ndarray:
        """(3, 4) float32 [L | c]: a pixel's optical density (column, per R, G, B) goes to L @ od + c when each stain's
        amount is scaled and shifted (amounts = od @ inverse(_HED_TO_OD), row-wise). Not affine in RGB (od = -log
        of the intensity), so it runs before the colour map, where the batch lands (device_batch.stain_moved)."""
        linear = ((_OD_TO_HED * np.asarray(self.hed_scale)) @ _HED_TO_OD).T  # inv(M) diag(scale) M, transposed
        offset = np.asarray(self.hed_shift) @ _HED_TO_OD
        return np.concatenate([linear, offset[:, None]], axis=1).astype(np.float32)

    @property
    def moves(self) -> tuple[int, int, int]:
        """(hflip, vflip, rot90 k) for `apply_moves`: the same k on both images keeps non-square pairs consistent."""
        return int(self.hflip), int(self.vflip), self.rot90

    def colour(self, mean_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) with jittered = A @ rgb + b on [0, 1]: brightness, contrast, saturation, hue in that order.
        Contrast pulls towards the mean grey of the image whose channel means are `mean_rgb`; both images of a pair
        get the model image's, so exactly the same map. Clamping to [0, 1] happens once, after the whole map
        (per-step clamps would differ only for pixels pushed out of range midway)."""
        a, pivot = self.colour_linear()
        return a, np.full(3, pivot * float(GREY @ mean_rgb))

    def colour_linear(self) -> tuple[np.ndarray, float]:
        """(A, p): the map is A @ rgb + p * grey(mean rgb) in every channel; A and p need no pixels."""
        # brightness x -> B x; contrast x -> C x + (1 - C) * grey(B mean); saturation S = s I + (1 - s) 1 g^T;
        # hue H = a rotation of the YIQ chroma plane (luminance kept; ~10x cheaper than an HSV round trip).
        # H 1 = S 1 = 1 and H 1 g^T = 1 g^T, so A = C B (s H + (1 - s) 1 g^T), H = H0 + cos H1 + sin H2, b ~ 1.
        turn = 2 * math.pi * self.hue
        scale = self.contrast * self.brightness
        coef = np.array(
            [
                scale * self.saturation,
                scale * self.saturation * math.cos(turn),
                scale * self.saturation * math.sin(turn),
                scale * (1 - self.saturation),
            ]
        )
        return (coef @ _COLOUR_BASIS).reshape(3, 3), (1 - self.contrast) * self.brightness


def _stain_draw(strength: float, rng: random.Random) -> dict[str, tuple[float, float, float]]:
    scale = tuple(rng.uniform(1 - strength, 1 + strength) for _ in range(3))
    shift = tuple(rng.uniform(-strength, strength) for _ in range(3))
    return {"hed_scale": scale, "hed_shift": shift}


def apply_moves(image: torch.Tensor, hflip: int, vflip: int, k: int) -> torch.Tensor:
    """(..., H, W) image: flip left-right, then top-bottom, then rotate k quarter turns counter-clockwise, as
    np.rot90(img[::-1 if vflip, ::-1 if hflip], k) on an (H, W) array."""
    dims = [d for d, flip in ((-1, hflip), (-2, vflip)) if flip]
    if dims:
        image = torch.flip(image, dims)
    return torch.rot90(image, k, dims=(-2, -1)) if k % 4 else image


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
        self._template = np.empty((3, 6), np.float32)  # [. | b | low | high] of a map whose b is 0 on [0, 1]
        self._template[:, 3], self._template[:, 4:] = self.offset, self.bounds
        self._a_scale = (self.scale / 255.0)[:, None]
        self.plain = self.map(np.eye(3))

    def map(self, a: np.ndarray) -> np.ndarray:
        """The (3, 6) map of jittered = a @ rgb on [0, 1]; the image-dependent offset comes from `pivot`."""
        out = self._template.copy()
        with np.errstate(invalid="ignore" if self.degenerate else "warn"):
            out[:, :3] = a * self._a_scale
        return out

    def pivot(self, p: float) -> np.ndarray:
        """(3,) float64: what b gains per unit of the model image's mean grey level, in standardised units."""
        return p * self.scale
