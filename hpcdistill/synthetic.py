"""Synthetic H&E-like whole-slide images (true Aperio SVS or generic pyramidal TIFF) and a labels CSV.

A slide is a deterministic *scene* described in micrometres: a few irregular tissue pieces (union of
ellipses whose boundary is perturbed by smooth value noise, with a few lumen-like holes) on a white glass
background. Tissue is pink eosin stroma with a fibrous texture plus dark purple hematoxylin nuclei. Colours
come from Beer-Lambert stain mixing with a per-slide, class-independent jitter of the stain vectors,
stain intensities and background brightness, so low-resolution colour does not give the label away.

Nuclei sit one per cell of a global square grid (spacing ``c`` µm). A cell keeps its nucleus with the
per-tissue probability ``p`` (class-independent jitter), and a nucleus never leaves its cell, so each
pixel only needs its own cell's nucleus: any region renders independently and tiles are seamless.

THE CLASS SIGNAL LIVES IN FINE DETAIL. Per class, only nuclear size, shape and density change; the grid
spacing is chosen so the expected hematoxylin (nuclear) area fraction ``p * pi*a*b / c**2`` is the same
``NUCLEAR_AREA_FRACTION`` (0.13 at the mean ``p`` of 0.8; each tissue piece jitters ``p`` by +-20%,
whatever the class), hence the mean colour at low resolution is the same for every class.
Semi-axes (a, b) in µm at ``signal=1`` (nucleus diameter 2a x 2b):

    id  name          a     b     shape / look                    cell spacing c (µm)
    0   normal        3.75  3.75  medium round, regular           16.5
    1   duodenitis    2.50  2.50  many small round (lymphocytes)  11.0
    2   celiac        6.00  2.20  elongated, locally aligned      16.0
    3   hyperplastic  5.50  5.50  few large round                 24.2
    4   atypical      4.50  1.60  small, thin, elongated          11.8

``signal`` (0..1, the difficulty knob) moves (a, b) linearly from the neutral nucleus (3.75, 3.75) to the
class values: 0 makes classes indistinguishable, 1 is the table above. Every nucleus also gets a
class-independent +-15% size jitter, intensity jitter and a darker chromatin rim. At 40x (0.25 µm/px)
nuclei are 13-48 px wide, at 10x 3-12 px, at 0.625x (16 µm/px) they are sub-pixel, so the information is
really lost at low magnification.

Writing streams pre-encoded JPEG tiles into tifffile (a generator of bytes), so memory stays bounded
for 60000x60000 slides; background tiles reuse one cached encoded tile. Reduced pyramid levels are
rendered from the scene at their own resolution (never from a level-0 image). When nuclei are smaller
than a few pixels of a level, that level draws their expected coverage instead (same mean colour).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import imagecodecs
import numpy as np
import tifffile

from hpcdistill.errors import HpcdistillError

CLASS_NAMES = ("normal", "duodenitis", "celiac", "hyperplastic", "atypical")
# (a, b) nuclear semi-axes in µm, see the module docstring table.
CLASS_NUCLEI = ((3.75, 3.75), (2.5, 2.5), (6.0, 2.2), (5.5, 5.5), (4.5, 1.6))
NEUTRAL_NUCLEUS = (3.75, 3.75)
NUCLEAR_AREA_FRACTION = 0.13
KEEP_PROBABILITY = 0.8  # mean fraction of grid cells holding a nucleus
SIZE_JITTER = 0.15
TILE = 256
JPEG_QUALITY = 90
APERIO_HEADER = "Aperio Image Library v12.0.0"
# Optical densities per RGB channel (Ruifrok & Johnston), jittered per slide.
HEMATOXYLIN_OD = (0.65, 0.70, 0.29)
EOSIN_OD = (0.07, 0.85, 0.45)
MIN_LEVEL_SIZE = 512  # add /4 pyramid levels while their larger side is at least this


class SyntheticError(HpcdistillError):
    """Bad arguments for synthetic slide or dataset writing."""


# --------------------------------------------------------------------------- deterministic hashing


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrap-around arithmetic is intended)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _stream_key(seed: int, stream: int) -> np.uint64:
    return np.uint64(int(_mix64(np.array([(seed * 1000003 + stream) & (2**64 - 1)], np.uint64))[0]))


def _hash_uniform(iy: np.ndarray, ix: np.ndarray, key: np.uint64) -> np.ndarray:
    """Uniform [0, 1) float32 per integer lattice point (iy, ix), broadcasting; same point -> same value."""
    hy = iy.astype(np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    hx = ix.astype(np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    h = _mix64(hy ^ _mix64(hx ^ key))
    return ((h >> np.uint64(40)).astype(np.float32)) * np.float32(2.0**-24)


def _value_noise(uy: np.ndarray, ux: np.ndarray, spacing: float, key: np.uint64) -> np.ndarray:
    """Smooth value noise in [0, 1] on the pixel grid given by row (uy) and column (ux) µm coordinates.

    The lattice is global, so noise is seamless across tiles; the separable interpolation keeps it cheap.
    """
    gy, gx = uy / spacing, ux / spacing
    iy0, ix0 = np.floor(gy).astype(np.int64), np.floor(gx).astype(np.int64)
    sy, sx = (gy - iy0).astype(np.float32), (gx - ix0).astype(np.float32)
    sy, sx = sy * sy * (3 - 2 * sy), sx * sx * (3 - 2 * sx)
    ly = np.arange(iy0.min(), iy0.max() + 2)
    lx = np.arange(ix0.min(), ix0.max() + 2)
    lattice = _hash_uniform(ly[:, None], lx[None, :], key)
    cx0, cy0 = ix0 - lx[0], iy0 - ly[0]
    along_x = lattice[:, cx0] * (1 - sx) + lattice[:, cx0 + 1] * sx  # (lattice rows, W)
    return along_x[cy0] * (1 - sy)[:, None] + along_x[cy0 + 1] * sy[:, None]


# --------------------------------------------------------------------------- scene description


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    a: float
    b: float
    angle: float


@dataclass(frozen=True)
class TissuePiece:
    ellipses: tuple[Ellipse, ...]
    bbox_um: tuple[float, float, float, float]  # x0, y0, x1, y1
    keep: float  # probability that a grid cell holds a nucleus (class-independent)
    eosin: float  # stroma eosin concentration


@dataclass(frozen=True)
class Scene:
    """Everything needed to render any region of one slide at any downsample."""

    width: int
    height: int
    mpp: float
    class_id: int
    seed: int
    pieces: tuple[TissuePiece, ...]
    nucleus_ab: tuple[float, float]  # class semi-axes in µm after applying `signal`
    cell_um: float
    nucleus_angle: float  # mean orientation of elongated nuclei
    h_od: np.ndarray = field(repr=False)  # (3,) hematoxylin optical density per channel
    e_od: np.ndarray = field(repr=False)
    background: np.ndarray = field(repr=False)  # (3,) glass RGB
    noise_tile: np.ndarray = field(repr=False)  # (TILE, TILE, 3) periodic sensor noise
    boundary_um: float  # lattice of the tissue-boundary noise

    def tissue_boxes(self) -> list[tuple[int, int, int, int]]:
        """Level-0 pixel boxes (x, y, w, h) of the tissue pieces."""
        boxes = []
        for p in self.pieces:
            x0, y0, x1, y1 = (v / self.mpp for v in p.bbox_um)
            x0, y0 = max(0, int(x0)), max(0, int(y0))
            x1, y1 = min(self.width, math.ceil(x1)), min(self.height, math.ceil(y1))
            boxes.append((x0, y0, x1 - x0, y1 - y0))
        return boxes


def class_nucleus(class_id: int, signal: float = 1.0) -> tuple[float, float]:
    """Nuclear semi-axes (a, b) in µm for a class at a given signal strength (0 = neutral, 1 = full)."""
    if not 0 <= class_id < len(CLASS_NUCLEI):
        raise SyntheticError(f"class_id {class_id}: must be in 0..{len(CLASS_NUCLEI) - 1}")
    if not 0.0 <= signal <= 1.0:
        raise SyntheticError(f"signal {signal}: must be in [0, 1]")
    a, b = CLASS_NUCLEI[class_id]
    na, nb = NEUTRAL_NUCLEUS
    return na + signal * (a - na), nb + signal * (b - nb)


def cell_spacing(ab: tuple[float, float]) -> float:
    """Grid spacing (µm) giving NUCLEAR_AREA_FRACTION at KEEP_PROBABILITY for nuclei of semi-axes ab."""
    return math.sqrt(KEEP_PROBABILITY * math.pi * ab[0] * ab[1] / NUCLEAR_AREA_FRACTION)


def make_scene(width: int, height: int, *, mpp: float, class_id: int, seed: int, n_tissues: int = 3,
               signal: float = 1.0) -> Scene:
    """Build the deterministic description of one slide (no pixels are rendered here)."""
    if width < 64 or height < 64:
        raise SyntheticError(f"slide size {width}x{height}: each side must be at least 64 px")
    if not mpp > 0:
        raise SyntheticError(f"mpp {mpp}: must be positive")
    if n_tissues < 1:
        raise SyntheticError(f"n_tissues {n_tissues}: must be at least 1")
    ab = class_nucleus(class_id, signal)
    # All random draws below are class-independent: same seed -> same layout and stain for every class.
    rng = np.random.default_rng([seed, 0x5EED])
    w_um, h_um = width * mpp, height * mpp
    cols = max(1, round(math.sqrt(n_tissues * w_um / h_um)))
    rows = math.ceil(n_tissues / cols)
    slot_w, slot_h = w_um / cols, h_um / rows
    slots = rng.permutation(cols * rows)[:n_tissues]
    pieces = []
    for slot in sorted(slots.tolist()):
        r = 0.44 * min(slot_w, slot_h) * rng.uniform(0.75, 1.0)
        half = 1.15 * r
        cx = (slot % cols + 0.5) * slot_w + rng.uniform(-1, 1) * max(0.0, slot_w / 2 - half)
        cy = (slot // cols + 0.5) * slot_h + rng.uniform(-1, 1) * max(0.0, slot_h / 2 - half)
        ellipses = []
        for _ in range(int(rng.integers(3, 6))):
            ea = r * rng.uniform(0.45, 0.65)
            ellipses.append(Ellipse(cx + rng.uniform(-1, 1) * 0.35 * r / math.sqrt(2),
                                    cy + rng.uniform(-1, 1) * 0.35 * r / math.sqrt(2),
                                    ea, ea * rng.uniform(0.5, 1.0), rng.uniform(0, math.pi)))
        pieces.append(TissuePiece(tuple(ellipses), (cx - half, cy - half, cx + half, cy + half),
                                  keep=KEEP_PROBABILITY * rng.uniform(0.8, 1.2),
                                  eosin=rng.uniform(0.35, 0.6)))
    h_od = np.asarray(HEMATOXYLIN_OD) + rng.normal(0, 0.04, 3)
    e_od = np.asarray(EOSIN_OD) + rng.normal(0, 0.04, 3)
    h_od = np.abs(h_od) / np.linalg.norm(h_od) * rng.uniform(0.85, 1.2)
    e_od = np.abs(e_od) / np.linalg.norm(e_od) * rng.uniform(0.85, 1.2)
    background = np.full(3, rng.uniform(232, 246)) + rng.normal(0, 1.5, 3)
    noise_tile = np.clip(np.round(rng.normal(0, 1.6, (TILE, TILE, 3))), -4, 4).astype(np.float32)
    mean_r = float(np.mean([p.bbox_um[2] - p.bbox_um[0] for p in pieces])) / 2.3
    return Scene(width, height, float(mpp), class_id, seed, tuple(pieces), ab, cell_spacing(ab),
                 float(rng.uniform(0, math.pi)), h_od.astype(np.float32), e_od.astype(np.float32),
                 background.astype(np.float32), noise_tile, boundary_um=max(mean_r / 3.0, 20.0))


# --------------------------------------------------------------------------- rendering


def _tissue_alpha(scene: Scene, uy: np.ndarray, ux: np.ndarray, pixel_um: float,
                  pieces: Sequence[tuple[int, TissuePiece]]) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue coverage (H, W) and the index of the piece covering each pixel (-1: none)."""
    shape = (uy.size, ux.size)
    alpha = np.zeros(shape, np.float32)
    owner = np.full(shape, -1, np.int16)
    wobble = (_value_noise(uy, ux, scene.boundary_um, _stream_key(scene.seed, 1)) - 0.5) * (
        0.9 * scene.boundary_um)
    dy0, dx0 = (uy - uy[0]).astype(np.float32)[:, None], (ux - ux[0]).astype(np.float32)[None, :]
    for index, piece in pieces:
        dist = np.full(shape, -np.inf, np.float32)
        for e in piece.ellipses:
            c, s = math.cos(e.angle), math.sin(e.angle)
            ox, oy = np.float32(ux[0] - e.cx), np.float32(uy[0] - e.cy)
            xr = (dx0 + ox) * np.float32(c) + (dy0 + oy) * np.float32(s)
            yr = (dy0 + oy) * np.float32(c) - (dx0 + ox) * np.float32(s)
            r = np.sqrt((xr / e.a) ** 2 + (yr / e.b) ** 2)
            np.maximum(dist, (1 - r) * np.float32(e.b), out=dist)  # ~signed distance inside, µm
        cover = np.clip(0.5 + (dist + wobble) / np.float32(pixel_um), 0, 1)
        owner[cover > alpha] = index
        np.maximum(alpha, cover, out=alpha)
    if pixel_um <= 20.0:  # lumen-like holes; coarser grids (macro image) would alias them into blocks
        holes = _value_noise(uy, ux, 60.0, _stream_key(scene.seed, 2))
        alpha *= np.clip((0.86 - holes) * np.float32(60.0 / pixel_um) + 0.5, 0, 1)
    return alpha, owner


def _nuclei(scene: Scene, uy: np.ndarray, ux: np.ndarray, pixel_um: float, keep: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Nuclear coverage alpha (H, W) and hematoxylin concentration, from each pixel's own grid cell."""
    c = scene.cell_um
    a0, b0 = scene.nucleus_ab
    iy, ix = np.floor(uy / c).astype(np.int64), np.floor(ux / c).astype(np.int64)
    ly, lx = np.arange(iy[0], iy[-1] + 1)[:, None], np.arange(ix[0], ix[-1] + 1)[None, :]
    key = lambda k: _stream_key(scene.seed, 100 + k)  # noqa: E731
    size = 1 + SIZE_JITTER * (2 * _hash_uniform(ly, lx, key(0)) - 1)
    a, b = a0 * size, b0 * size
    elongation = a0 / b0 if b0 > 0 else 1.0
    spread = math.pi if elongation < 1.2 else 0.5 * math.pi  # elongated nuclei are locally aligned
    angle = scene.nucleus_angle + spread * (_hash_uniform(ly, lx, key(1)) - 0.5)
    # Half-extents of the rotated ellipse: the nucleus and its soft edge stay inside its cell.
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    half_x = np.sqrt((a * cos_a) ** 2 + (b * sin_a) ** 2) + 0.5 * pixel_um
    half_y = np.sqrt((a * sin_a) ** 2 + (b * cos_a) ** 2) + 0.5 * pixel_um
    cx = (lx + 0.5) * c + np.maximum(c / 2 - half_x, 0) * (2 * _hash_uniform(ly, lx, key(2)) - 1)
    cy = (ly + 0.5) * c + np.maximum(c / 2 - half_y, 0) * (2 * _hash_uniform(ly, lx, key(3)) - 1)
    darkness = 1.3 + 0.4 * _hash_uniform(ly, lx, key(4))
    lottery = _hash_uniform(ly, lx, key(5))
    # Gather per-pixel parameters of the pixel's own cell via one flat index.
    flat = (iy - iy[0])[:, None] * lx.shape[1] + (ix - ix[0])[None, :]

    def take(v: np.ndarray) -> np.ndarray:
        return np.broadcast_to(v, (ly.shape[0], lx.shape[1])).astype(np.float32).ravel()[flat]

    dx = ux.astype(np.float32)[None, :] - take(cx)
    dy = uy.astype(np.float32)[:, None] - take(cy)
    cos, sin = take(cos_a), take(sin_a)
    ia2, ib2 = take(1 / a**2), take(1 / b**2)
    xr, yr = dx * cos + dy * sin, dy * cos - dx * sin
    q2 = xr * xr * ia2 + yr * yr * ib2
    grad = 2 * np.sqrt((xr * ia2) ** 2 + (yr * ib2) ** 2) + np.float32(1e-9)
    alpha = np.clip(0.5 - (q2 - 1) / grad / np.float32(pixel_um), 0, 1)
    alpha *= take(lottery) < keep
    h_conc = take(darkness) * (0.75 + 0.35 * np.minimum(q2, 1))  # darker chromatin rim
    return alpha, h_conc


def render_region(scene: Scene, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
    """RGB uint8 (h, w, 3) of the region whose top-left pixel is (x, y) on the grid of `downsample`.

    Pixel (i, j) samples the scene at level-0 position ((x+j+0.5)*downsample, (y+i+0.5)*downsample).
    The result depends only on the scene and the pixel grid, so adjacent regions join seamlessly.
    """
    pixel_um = downsample * scene.mpp
    ux = (np.arange(x, x + w) + 0.5) * pixel_um
    uy = (np.arange(y, y + h) + 0.5) * pixel_um
    noise = scene.noise_tile.take(np.arange(y, y + h) % TILE, axis=0).take(np.arange(x, x + w) % TILE, axis=1)
    rgb = noise + scene.background
    pieces = [(i, p) for i, p in enumerate(scene.pieces)
              if p.bbox_um[0] < ux[-1] + pixel_um and p.bbox_um[2] > ux[0] - pixel_um
              and p.bbox_um[1] < uy[-1] + pixel_um and p.bbox_um[3] > uy[0] - pixel_um]
    tissue, owner = _tissue_alpha(scene, uy, ux, pixel_um, pieces) if pieces else (None, None)
    if tissue is None or not tissue.any():
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    # Colour only the tissue pixels (flat arrays), nuclei only where they cover something.
    inside = np.flatnonzero(tissue)
    owner = owner.ravel()[inside]
    keep = np.zeros(inside.size, np.float32)
    eosin = np.zeros(inside.size, np.float32)
    for i, p in pieces:
        keep[owner == i] = p.keep
        eosin[owner == i] = p.eosin
    if pixel_um < 8.0:  # anisotropic fibrous stroma texture, invisible below ~1.25x
        eosin *= 0.7 + 0.6 * _value_noise(uy, ux * 0.35, 12.0, _stream_key(scene.seed, 3)).ravel()[inside]
    tissue_rgb = scene.background * np.exp(-(0.06 * scene.h_od + eosin[:, None] * scene.e_od))
    if scene.cell_um / pixel_um >= 3.0:
        keep_full = np.zeros(tissue.size, np.float32)
        keep_full[inside] = keep
        alpha, h_conc = _nuclei(scene, uy, ux, pixel_um, keep_full.reshape(tissue.shape))
        alpha, h_conc = alpha.ravel()[inside], h_conc.ravel()[inside]
    else:  # nuclei are a few pixels or less: draw their expected coverage (same mean colour)
        mean_area = math.pi * scene.nucleus_ab[0] * scene.nucleus_ab[1] * (1 + SIZE_JITTER**2 / 3)
        alpha = keep * np.float32(mean_area / scene.cell_um**2)
        h_conc = np.full(inside.size, 1.5 * 0.925, np.float32)  # mean darkness x mean rim factor
    hit = np.flatnonzero(alpha)
    nucleus = scene.background * np.exp(-(h_conc[hit, None] * scene.h_od
                                          + 0.15 * eosin[hit, None] * scene.e_od))
    tissue_rgb[hit] += alpha[hit, None] * (nucleus - tissue_rgb[hit])
    flat = rgb.reshape(-1, 3)
    flat[inside] += tissue[..., None].reshape(-1, 1)[inside] * (tissue_rgb - scene.background)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def render_image(scene: Scene, w: int, h: int, downsample: float) -> np.ndarray:
    """A whole small image (thumbnail, macro) rendered in bands of TILE rows to bound temporaries."""
    out = np.empty((h, w, 3), np.uint8)
    for y in range(0, h, TILE):
        out[y:y + TILE] = render_region(scene, 0, y, w, min(TILE, h - y), downsample)
    return out


# --------------------------------------------------------------------------- writing


def _encode_jpeg(tile: np.ndarray) -> bytes:
    return imagecodecs.jpeg8_encode(tile, level=JPEG_QUALITY, colorspace="RGB", outcolorspace="YCBCR",
                                    subsampling=(2, 2))


def _level_tiles(scene: Scene, downsample: float, width: int, height: int, jpeg: bool
                 ) -> Iterator[bytes | np.ndarray]:
    """Yield the tiles of one level in row-major order; background tiles reuse one cached encoding."""
    pixel_um = downsample * scene.mpp
    blank: bytes | np.ndarray | None = None
    for ty in range(0, height, TILE):
        y0, y1 = ty * pixel_um, (ty + TILE) * pixel_um
        row = [p for p in scene.pieces if p.bbox_um[1] < y1 + pixel_um and p.bbox_um[3] > y0 - pixel_um]
        for tx in range(0, width, TILE):
            x0, x1 = tx * pixel_um, (tx + TILE) * pixel_um
            empty = not any(p.bbox_um[0] < x1 + pixel_um and p.bbox_um[2] > x0 - pixel_um for p in row)
            if empty and blank is not None:
                yield blank
                continue
            tile = render_region(scene, tx, ty, TILE, TILE, downsample)
            out = _encode_jpeg(tile) if jpeg else tile
            if empty:
                blank = out
            yield out


def _level_shapes(width: int, height: int) -> list[tuple[int, int, int]]:
    """(downsample, w, h) per pyramid level: level 0 then /4 while the larger side >= MIN_LEVEL_SIZE."""
    levels = [(1, width, height)]
    f = 4
    while max(width // f, height // f) >= MIN_LEVEL_SIZE:
        levels.append((f, width // f, height // f))
        f *= 4
    return levels


def _fit(width: int, height: int, longest: int) -> tuple[int, int, float]:
    d = max(width, height) / longest
    return max(1, round(width / d)), max(1, round(height / d)), d


def _label_image(seed: int) -> np.ndarray:
    """A slide label: white card with a seed-dependent barcode."""
    img = np.full((300, 300, 3), 250, np.uint8)
    bars = np.random.default_rng([seed, 0x1ABE1]).integers(0, 2, 60).astype(bool)
    for i, bar in enumerate(bars):
        if bar:
            img[40:140, 30 + 4 * i:33 + 4 * i] = 20
    img[180:200, 30:270] = 60
    return img


def _macro_image(scene: Scene) -> np.ndarray:
    """Whole glass slide: label area on the left, then the scanned area rendered small."""
    w, h, d = _fit(scene.width, scene.height, 600)
    body = render_image(scene, w, h, d)
    macro = np.full((h + 40, w + 40 + h, 3), 200, np.uint8)
    label = _label_image(scene.seed)
    pick = np.arange(h) * label.shape[0] // h  # nearest-neighbour resize of the label to h x h
    macro[20:20 + h, 20:20 + h] = label[pick][:, pick]
    macro[20:20 + h, 20 + h:20 + h + w] = body
    return macro


def _aperio_tail(base_mag: float, mpp: float, with_metadata: bool) -> str:
    return f"|AppMag = {base_mag:g}|MPP = {mpp:.4f}" if with_metadata else ""


def write_slide(path: str | os.PathLike, width: int, height: int, *, fmt: str = "svs", base_mag: float = 40,
                mpp: float | None = None, class_id: int = 0, seed: int = 0, n_tissues: int = 3,
                tile: int = TILE, jpeg: bool = True, with_metadata: bool = True, signal: float = 1.0) -> dict:
    """Write one synthetic slide, streaming tile by tile; returns its description (tissue boxes etc.).

    fmt="svs": Aperio layout (tiled level 0, stripped thumbnail, tiled /4 levels, label, macro).
    fmt="tiff": generic pyramidal tiled TIFF, one page per level, resolution tags in px/cm giving mpp.
    mpp defaults to 10 / base_mag (40x -> 0.25 µm/px). with_metadata=False omits AppMag/MPP and
    resolution (tifffile then writes XResolution=1 with ResolutionUnit NONE, i.e. unknown).
    """
    path = Path(path)
    if fmt not in ("svs", "tiff"):
        raise SyntheticError(f"{path}: fmt {fmt!r} must be 'svs' or 'tiff'")
    if tile != TILE:
        raise SyntheticError(f"{path}: tile {tile} unsupported; only {TILE} is written")
    if not base_mag > 0:
        raise SyntheticError(f"{path}: base_mag {base_mag} must be positive")
    mpp = float(mpp) if mpp is not None else 10.0 / base_mag
    scene = make_scene(width, height, mpp=mpp, class_id=class_id, seed=seed, n_tissues=n_tissues,
                       signal=signal)
    levels = _level_shapes(width, height)
    compression = ("jpeg", {"level": JPEG_QUALITY}) if jpeg else ("zlib", {"level": 6})
    tiled = dict(tile=(TILE, TILE), dtype=np.uint8, photometric="rgb", compression=compression[0],
                 compressionargs=compression[1], metadata=None, software=False)
    q = f"JPEG/RGB Q={JPEG_QUALITY}" if jpeg else "Deflate/RGB"
    head = f"{APERIO_HEADER}\r\n{width}x{height} [0,100 {width}x{height}] ({TILE}x{TILE})"
    tail = _aperio_tail(base_mag, mpp, with_metadata)
    big = width * height * 3 > 2**31
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=big) as tif:
            for k, (f, lw, lh) in enumerate(levels):
                extra: dict = {}
                if fmt == "svs":
                    size = "" if k == 0 else f" -> {lw}x{lh}"
                    extra["description"] = f"{head}{size} {q}{tail}"
                elif with_metadata:
                    extra.update(resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)), resolutionunit="CENTIMETER")
                if k > 0:
                    extra["subfiletype"] = 1
                tif.write(_level_tiles(scene, f, lw, lh, jpeg), shape=(lh, lw, 3), **tiled, **extra)
                if fmt == "svs" and k == 0:
                    tw, th, d = _fit(width, height, 1024)
                    thumb_desc = f"{APERIO_HEADER}\r\n{width}x{height} -> {tw}x{th} - {tail}"
                    tif.write(render_image(scene, tw, th, d), photometric="rgb", compression="jpeg",
                              compressionargs={"level": JPEG_QUALITY}, rowsperstrip=16, metadata=None,
                              software=False, description=thumb_desc)
            if fmt == "svs":
                label = _label_image(seed)
                tif.write(label, photometric="rgb", compression="lzw", rowsperstrip=label.shape[0], metadata=None,
                          software=False, subfiletype=1,
                          description=f"{APERIO_HEADER}\r\nlabel {label.shape[1]}x{label.shape[0]}")
                macro = _macro_image(scene)
                tif.write(macro, photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_QUALITY},
                          rowsperstrip=16, metadata=None, software=False, subfiletype=9,
                          description=f"{APERIO_HEADER}\r\nmacro {macro.shape[1]}x{macro.shape[0]}")
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written slide behind
        raise
    tmp.replace(path)
    return {"path": str(path), "format": fmt, "width": width, "height": height, "base_mag": float(base_mag),
            "mpp": mpp if with_metadata else None, "class_id": class_id, "seed": seed,
            "levels": [(lw, lh) for _, lw, lh in levels], "tissue_boxes": scene.tissue_boxes()}


# --------------------------------------------------------------------------- datasets

# (format, base magnification) cycled over slides; tiff slides carry their magnification only through mpp.
DATASET_FORMATS = (("svs", 40.0), ("svs", 20.0), ("tiff", 40.0), ("svs", 40.0), ("tiff", 20.0))
LABELS_CSV_COLUMNS = ("slide", "patient", "label", "split")


def dataset_classes(classes: Sequence[str] | int) -> list[str]:
    """Class names: an int n picks CLASS_NAMES[:n]; names map in order onto the per-class nuclei table."""
    names = list(CLASS_NAMES[:classes]) if isinstance(classes, int) else [str(c) for c in classes]
    if not 2 <= len(names) <= len(CLASS_NAMES) or len(set(names)) != len(names) or "" in names:
        raise SyntheticError(f"classes {classes!r}: need 2..{len(CLASS_NAMES)} distinct non-empty names")
    return names


def write_dataset(out_dir: str | os.PathLike, *, n_slides_per_split: dict[str, int] | None = None,
                  classes: Sequence[str] | int = 3, n_aux1: int = 3, n_aux2: int = 3,
                  size: tuple[int, int] = (4096, 3072), n_tissues: tuple[int, int] = (2, 4),
                  signal: float = 1.0, seed: int = 0, jpeg: bool = True) -> tuple[list[Path], Path]:
    """Write labeled slides (splits), unlabeled aux slides and `labels.csv`; returns (slide paths, csv path).

    Labeled slides belong to patients (every third patient has two slides of the same class and split;
    classes cycle over patients). Unlabeled slides have label "" and split 'aux1' (ADv1) or 'aux2' (the
    extra slides of ADv2), so ADv1 = aux1 and ADv2 = aux1 + aux2. `size` is (width, height) at 40x;
    20x slides cover the same physical area with half the pixels. Deterministic for a given seed.
    """
    out = Path(out_dir)
    names = dataset_classes(classes)
    splits = {"train": 9, "val": 3, "test": 3} if n_slides_per_split is None else dict(n_slides_per_split)
    for split, n in splits.items():
        if split.startswith("aux") or not split or n < 0:
            raise SyntheticError(f"n_slides_per_split[{split!r}]={n}: need a non-aux name and a count >= 0")
    if min(n_aux1, n_aux2) < 0 or n_tissues[0] < 1 or n_tissues[1] < n_tissues[0]:
        raise SyntheticError(f"{out}: aux counts must be >= 0 and n_tissues a range (lo>=1, hi>=lo)")
    rows: list[tuple[str, str, str, str, int | None]] = []  # slide, patient, label, split, class id
    patient = 0
    for split, n in splits.items():
        done, j = 0, 0
        while done < n:
            # Two-slide patients only while every class still gets a patient in this split.
            count = 2 if j % 3 == 1 and n - done - 2 >= len(names) - j - 1 else 1
            cls = j % len(names)
            rows += [("", f"P{patient:03d}", names[cls], split, cls)] * count
            done, j, patient = done + count, j + 1, patient + 1
    for split, n in (("aux1", n_aux1), ("aux2", n_aux2)):
        for _ in range(n):
            rows.append(("", f"A{patient:03d}", "", split, None))
            patient += 1
    rng = np.random.default_rng([seed, 0xDA7A])
    paths: list[Path] = []
    records = []
    for idx, (_, pid, label, split, cls) in enumerate(rows):
        fmt, mag = DATASET_FORMATS[idx % len(DATASET_FORMATS)]
        scale = mag / 40.0
        n_t = int(rng.integers(n_tissues[0], n_tissues[1] + 1))
        # Unlabeled slides still draw from the same class mixture (their label is just not given).
        cls_id = cls if cls is not None else int(rng.integers(0, len(names)))
        slide_seed = int(rng.integers(0, 2**31 - 1))
        name = f"slide_{idx:03d}.{fmt}"
        write_slide(out / name, max(64, round(size[0] * scale)), max(64, round(size[1] * scale)), fmt=fmt,
                    base_mag=mag, class_id=cls_id, seed=slide_seed, n_tissues=n_t, jpeg=jpeg, signal=signal)
        paths.append(out / name)
        records.append((name, pid, label, split))
    csv_path = out / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABELS_CSV_COLUMNS)
        writer.writerows(records)
    return paths, csv_path
