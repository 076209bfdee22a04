"""Polygons to a pixel mask by a scanline fill, in time bounded by what is drawn, never by the shape's complexity.

A polygon is a list of rings (exterior, then holes) of level-0 (x, y) vertices; a mask pixel is in the polygon when
its centre is, by the even-odd rule over all its rings (so a hole is a hole, and a ring that crosses itself is read
by parity, as GEOS' `make_valid` reads it). Several polygons are united. The work is counted before it is done: the
rows each edge crosses plus the pixels of each polygon's bounding box, against the `region_raster_work` limit."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Ring = np.ndarray  # (n, 2) float64 level-0 x, y; closed implicitly (the last vertex joins the first)


class TooIntricate(ValueError):
    """The mask would cost more than the limit allows at this resolution."""


def _crossings(ring: Ring, rows: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(row, x in pixel units) of every crossing of the ring's edges with a row of pixel centres: row r's centres
    lie at y = (r + 0.5) * scale; an edge covers the half-open range of rows [ceil(lo), ceil(hi))."""
    start = ring / scale - 0.5
    end = np.roll(start, -1, axis=0)
    (xa, ya), (xb, yb) = start.T, end.T
    first = np.clip(np.ceil(np.minimum(ya, yb)), 0, rows).astype(np.int64)
    stop = np.clip(np.ceil(np.maximum(ya, yb)), 0, rows).astype(np.int64)
    counts = stop - first
    edge = np.repeat(np.arange(len(counts)), counts)
    offsets = np.arange(len(edge)) - np.repeat(np.cumsum(counts) - counts, counts)
    row = first[edge] + offsets
    t = (row - ya[edge]) / (yb[edge] - ya[edge])  # counts > 0 only where ya != yb
    return row, xa[edge] + t * (xb[edge] - xa[edge])


def polygon_work(rings: Sequence[Ring], shape: tuple[int, int], scale: float) -> int:
    """The crossings and pixels filling this polygon would cost (what `fill` checks against its budget)."""
    height, width = shape
    crossings = 0
    for ring in rings:
        ys = ring[:, 1] / scale - 0.5
        spans = np.abs(np.clip(np.ceil(np.roll(ys, -1)), 0, height) - np.clip(np.ceil(ys), 0, height))
        crossings += int(spans.sum())
    box = _box(rings[0], shape, scale)
    pixels = (box[1] - box[0]) * (box[3] - box[2]) if box else 0
    return crossings + pixels + width // 64  # a row's fill is a vector op: count a little for each polygon


def _box(exterior: Ring, shape: tuple[int, int], scale: float) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1) of the mask pixels whose centres the exterior's bounding box may hold; None if none."""
    height, width = shape
    bound = np.array([width, height], dtype=np.float64)
    lo = np.clip(np.floor(exterior.min(axis=0) / scale - 0.5), 0, bound)
    hi = np.clip(np.ceil(exterior.max(axis=0) / scale - 0.5) + 1, 0, bound)
    (col0, row0), (col1, row1) = lo.astype(np.int64), hi.astype(np.int64)
    return (int(row0), int(row1), int(col0), int(col1)) if row1 > row0 and col1 > col0 else None


def fill(polygons: Sequence[Sequence[Ring]], shape: tuple[int, int], scale: float, budget: int) -> np.ndarray:
    """The union of the polygons as a boolean mask of `shape`, each mask pixel `scale` level-0 px; TooIntricate
    (before any filling) when the work would pass `budget`."""
    work = sum(polygon_work(rings, shape, scale) for rings in polygons if len(rings))
    if work > budget:
        raise TooIntricate(f"drawing it at {scale:.3g} level-0 px per pixel would take {work:,} steps (> {budget:,})")
    mask = np.zeros(shape, dtype=bool)
    for rings in polygons:
        box = _box(rings[0], shape, scale) if len(rings) else None
        if box is None:
            continue
        row0, row1, col0, col1 = box
        toggles = np.zeros((row1 - row0) * (col1 - col0 + 1), dtype=np.int64)
        for ring in rings:
            row, x = _crossings(ring, shape[0], scale)
            inside = (row >= row0) & (row < row1)
            # a crossing at x toggles every pixel whose centre column c is > x, i.e. from floor(x) + 1 on
            col = np.clip(np.floor(x[inside]) + 1, col0, col1).astype(np.int64) - col0
            toggles += np.bincount((row[inside] - row0) * (col1 - col0 + 1) + col, minlength=toggles.size)
        parity = np.cumsum(toggles.reshape(row1 - row0, col1 - col0 + 1), axis=1)[:, :-1] % 2 == 1
        mask[row0:row1, col0:col1] |= parity
    return mask
