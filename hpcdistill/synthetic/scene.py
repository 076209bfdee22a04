"""The synthetic H&E scene: a deterministic description of one slide in micrometres, rendered region by region
at any downsample (adjacent regions join seamlessly), with the class signal in fine detail only.

Irregular tissue pieces (unions of ellipses, noisy boundaries, lumen-like holes) on white glass: eosin stroma
with a fibrous texture and hematoxylin nuclei, colours by Beer-Lambert stain mixing with a per-slide,
class-independent jitter. At most one nucleus per cell of a global square grid (spacing c µm, kept with
probability p), never leaving its cell, so each pixel only needs its own cell's nucleus.

Per class only nuclear size, shape and density change; c keeps the expected nuclear area fraction
p * pi*a*b / c**2 at NUCLEAR_AREA_FRACTION, so the low-resolution colour is the same for every class.
Semi-axes (a, b) in µm at signal=1 (nucleus 2a x 2b; `signal` 0..1 moves them linearly from the neutral
(3.75, 3.75); every nucleus also gets a +-15% size jitter):

    id  name          a     b     shape / look                    cell spacing c (µm)
    0   normal        3.75  3.75  medium round, regular           16.5
    1   duodenitis    2.50  2.50  many small round (lymphocytes)  11.0
    2   celiac        6.00  2.20  elongated, locally aligned      16.0
    3   hyperplastic  5.50  5.50  few large round                 24.2
    4   atypical      4.50  1.60  small, thin, elongated          11.8

Where nuclei are smaller than a few pixels of the grid rendered, their expected coverage is drawn instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from hpcdistill.common.errors import SyntheticError

CLASS_NAMES = ("normal", "duodenitis", "celiac", "hyperplastic", "atypical")
# (a, b) nuclear semi-axes in µm, see the module docstring table.
CLASS_NUCLEI = ((3.75, 3.75), (2.5, 2.5), (6.0, 2.2), (5.5, 5.5), (4.5, 1.6))
NEUTRAL_NUCLEUS = (3.75, 3.75)
NUCLEAR_AREA_FRACTION = 0.13
KEEP_PROBABILITY = 0.8  # mean fraction of grid cells holding a nucleus
SIZE_JITTER = 0.15
TILE = 256  # edge (px) of the periodic sensor-noise tile, of render bands, and of the tiles slide files are written in
# Optical densities per RGB channel (Ruifrok & Johnston), jittered per slide.
HEMATOXYLIN_OD = (0.65, 0.70, 0.29)
EOSIN_OD = (0.07, 0.85, 0.45)


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


def _piece(rng: np.random.Generator, slot: int, cols: int, slot_w: float, slot_h: float) -> TissuePiece:
    """One tissue piece in its slot of the layout grid: a union of 3-5 ellipses."""
    r = 0.44 * min(slot_w, slot_h) * rng.uniform(0.75, 1.0)
    half = 1.15 * r
    cx = (slot % cols + 0.5) * slot_w + rng.uniform(-1, 1) * max(0.0, slot_w / 2 - half)
    cy = (slot // cols + 0.5) * slot_h + rng.uniform(-1, 1) * max(0.0, slot_h / 2 - half)
    ellipses = []
    for _ in range(int(rng.integers(3, 6))):
        ea = r * rng.uniform(0.45, 0.65)
        x = cx + rng.uniform(-1, 1) * 0.35 * r / math.sqrt(2)
        y = cy + rng.uniform(-1, 1) * 0.35 * r / math.sqrt(2)
        ellipses.append(Ellipse(x, y, ea, ea * rng.uniform(0.5, 1.0), rng.uniform(0, math.pi)))
    box = (cx - half, cy - half, cx + half, cy + half)
    return TissuePiece(
        tuple(ellipses), box, keep=KEEP_PROBABILITY * rng.uniform(0.8, 1.2), eosin=rng.uniform(0.35, 0.6)
    )


def site_stains(site: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean haematoxylin and eosin optical densities of a staining site: site 0 the reference; any other a fixed
    shift of the size seen between hospitals (each stain's hue turned by about 10-20 degrees, its strength changed
    by up to 30%), the same for every slide of that site."""
    if site == 0:
        return np.asarray(HEMATOXYLIN_OD), np.asarray(EOSIN_OD)
    rng = np.random.default_rng([site, 0x517E])
    shifted = []
    for od in (HEMATOXYLIN_OD, EOSIN_OD):
        turned = np.abs(np.asarray(od) + rng.normal(0, 0.25, 3))
        shifted.append(turned / np.linalg.norm(turned) * np.linalg.norm(od) * rng.uniform(0.7, 1.3))
    return shifted[0], shifted[1]


def _stain(rng: np.random.Generator, site: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The slide's haematoxylin and eosin optical densities (its site's, slightly varied) and its glass colour."""
    h_mean, e_mean = site_stains(site)
    h_od = h_mean + rng.normal(0, 0.04, 3)
    e_od = e_mean + rng.normal(0, 0.04, 3)
    h_od = np.abs(h_od) / np.linalg.norm(h_od) * rng.uniform(0.85, 1.2)
    e_od = np.abs(e_od) / np.linalg.norm(e_od) * rng.uniform(0.85, 1.2)
    background = np.full(3, rng.uniform(232, 246)) + rng.normal(0, 1.5, 3)
    return h_od, e_od, background


def make_scene(
    width: int,
    height: int,
    *,
    mpp: float,
    class_id: int,
    seed: int,
    n_tissues: int = 3,
    signal: float = 1.0,
    site: int = 0,
) -> Scene:
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
    pieces = [_piece(rng, slot, cols, slot_w, slot_h) for slot in sorted(slots.tolist())]
    h_od, e_od, background = _stain(rng, site)
    noise_tile = np.clip(np.round(rng.normal(0, 1.6, (TILE, TILE, 3))), -4, 4).astype(np.float32)
    mean_r = float(np.mean([p.bbox_um[2] - p.bbox_um[0] for p in pieces])) / 2.3
    return Scene(
        width,
        height,
        float(mpp),
        class_id,
        seed,
        tuple(pieces),
        ab,
        cell_spacing(ab),
        float(rng.uniform(0, math.pi)),
        h_od.astype(np.float32),
        e_od.astype(np.float32),
        background.astype(np.float32),
        noise_tile,
        boundary_um=max(mean_r / 3.0, 20.0),
    )


# --------------------------------------------------------------------------- rendering


def _tissue_alpha(
    scene: Scene, uy: np.ndarray, ux: np.ndarray, pixel_um: float, pieces: Sequence[tuple[int, TissuePiece]]
) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue coverage (H, W) and the index of the piece covering each pixel (-1: none)."""
    shape = (uy.size, ux.size)
    alpha = np.zeros(shape, np.float32)
    owner = np.full(shape, -1, np.int16)
    wobble = (_value_noise(uy, ux, scene.boundary_um, _stream_key(scene.seed, 1)) - 0.5) * (0.9 * scene.boundary_um)
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


def _nuclei(
    scene: Scene, uy: np.ndarray, ux: np.ndarray, pixel_um: float, keep: np.ndarray
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
    pieces = [
        (i, p)
        for i, p in enumerate(scene.pieces)
        if p.bbox_um[0] < ux[-1] + pixel_um
        and p.bbox_um[2] > ux[0] - pixel_um
        and p.bbox_um[1] < uy[-1] + pixel_um
        and p.bbox_um[3] > uy[0] - pixel_um
    ]
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
    nucleus = scene.background * np.exp(-(h_conc[hit, None] * scene.h_od + 0.15 * eosin[hit, None] * scene.e_od))
    tissue_rgb[hit] += alpha[hit, None] * (nucleus - tissue_rgb[hit])
    flat = rgb.reshape(-1, 3)
    flat[inside] += tissue[..., None].reshape(-1, 1)[inside] * (tissue_rgb - scene.background)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def render_image(scene: Scene, w: int, h: int, downsample: float) -> np.ndarray:
    """A whole small image (thumbnail, macro) rendered in bands of TILE rows to bound temporaries."""
    out = np.empty((h, w, 3), np.uint8)
    for y in range(0, h, TILE):
        out[y : y + TILE] = render_region(scene, 0, y, w, min(TILE, h - y), downsample)
    return out
