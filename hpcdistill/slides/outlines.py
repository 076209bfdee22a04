"""Tissue outlines as polygons a pathologist can open and edit: every contour of a tissue mask with its holes, traced
on a mask whose pixels are at most OUTLINE_PX level-0 px, simplified with a tolerance of SIMPLIFY_PX, valid under
shapely, in level-0 pixel coordinates. `shard` writes them (qc/<slide>.geojson) and `predict` classifies them (its
GeoJSON), so both draw a tissue the same way.

The bound: a vertex lies within one mask pixel (<= OUTLINE_PX level-0 px) of the mask's edge, plus SIMPLIFY_PX from
the simplification. Tissue is found on a thumbnail of about 1024 px (slides.tissue); where that thumbnail's pixels
are larger than OUTLINE_PX, the outline is traced on a finer thumbnail (read_fine_mask), thresholded as the tissue
finder thresholded the coarse one and kept inside the tissue it found."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

OUTLINE_PX = 16  # level-0 px per outline-mask pixel, at most (up to FINE_MAX_SIDE * OUTLINE_PX px slides)
SIMPLIFY_PX = 2.0  # level-0 px: the simplification's tolerance
FINE_MAX_SIDE = 8192  # the finest outline thumbnail's long side (memory: 8192 x 6144 RGB is 150 MB)


def mask_polygons(
    mask: np.ndarray, origin: tuple[int, int] = (0, 0), *, scale: float, slide_wh: tuple[int, int]
) -> Polygon | MultiPolygon:
    """Every contour of a boolean mask (thumbnail px, `scale` level-0 px each; `origin`: the (column, row) of its
    first pixel in the thumbnail, for a crop) with its holes, as one valid (Multi)Polygon in level-0 px, simplified
    by SIMPLIFY_PX and clipped to the slide; empty for an empty mask."""
    import contourpy

    padded = np.pad(mask.astype(np.float64), 1)
    generator = contourpy.contour_generator(z=padded, fill_type=contourpy.FillType.OuterOffset)
    points, offsets = generator.filled(0.5, math.inf)
    polygons = []
    shift = np.asarray(origin, dtype=np.float64) - 0.5  # padded index -> thumbnail px; exact (halves and integers)
    for outer, cuts in zip(points, offsets):
        rings = [(outer[a:b] + shift) * scale for a, b in zip(cuts[:-1], cuts[1:])]  # -> level 0
        if len(rings[0]) >= 4:
            polygons.append(Polygon(rings[0], [r for r in rings[1:] if len(r) >= 4]))
    if not polygons:
        return Polygon()
    # The contours of one mask never overlap (they may touch at a corner), so no union is needed; Douglas-Peucker
    # keeps every vertex within SIMPLIFY_PX, and the rare self-touching it makes is mended only where it occurs.
    shape = polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)
    shape = shapely.simplify(shape, SIMPLIFY_PX, preserve_topology=False)
    if not shape.is_valid:
        shape = shapely.make_valid(shape)
    x0, y0, x1, y1 = shape.bounds
    if x0 < 0 or y0 < 0 or x1 > slide_wh[0] or y1 > slide_wh[1]:  # a mask pixel on the slide's edge spills over
        shape = shapely.make_valid(shape.intersection(shapely.box(0, 0, *slide_wh)))
    return _polygonal(shape)


def _polygonal(shape: Any) -> Polygon | MultiPolygon:
    """The polygons of a geometry (make_valid and intersections may add lines or points along edges)."""
    parts = [g for g in getattr(shape, "geoms", [shape]) if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty]
    flat = [p for g in parts for p in getattr(g, "geoms", [g])]
    if not flat:
        return Polygon()
    return shapely.geometry.polygon.orient(flat[0]) if len(flat) == 1 else MultiPolygon(flat)


def outline_scale(slide_wh: tuple[int, int], coarse_scale: float) -> tuple[float, int]:
    """(level-0 px per outline-mask pixel, the outline thumbnail's long side): the coarse thumbnail when its pixels
    are fine enough, else a thumbnail of at most OUTLINE_PX (capped at FINE_MAX_SIDE px)."""
    if coarse_scale <= OUTLINE_PX:
        return coarse_scale, 0
    side = min(FINE_MAX_SIDE, math.ceil(max(slide_wh) / OUTLINE_PX))
    return max(slide_wh) / side, side


def tissue_outlines(slide: Any, found: Any, params: Any) -> list[Polygon | MultiPolygon]:
    """Each found tissue's outline (found: slides.windows.TissueWindows), on a mask of at most OUTLINE_PX px. Each
    tissue is traced within its own box (plus a margin), where all its pixels lie: the contours are those of the
    whole mask, at the cost of the box instead of the slide's mask once per tissue."""
    info = slide.info
    wh = (info.width, info.height)
    scale, side = outline_scale(wh, found.scale)
    if not side:
        crops = [_crop(found.mask(t), box, scale) for t, box in enumerate(found.boxes)]
        return [mask_polygons(mask, origin, scale=scale, slide_wh=wh) for mask, origin in crops]
    from hpcdistill.slides.tissue import fine_tissue_mask, tissue_threshold

    thumb, scale = slide.thumbnail(side)
    threshold = found.threshold  # the tissue finder's, on the coarse thumbnail
    if threshold is None:  # a TissueWindows made by hand: the finder's threshold, computed again
        threshold = tissue_threshold(found.thumb, params)
    shapes = []
    for box, label in zip(found.boxes, found.box_labels):
        crop, (col0, row0) = _crop(thumb, box, scale)
        rows = np.minimum(
            (np.arange(row0, row0 + crop.shape[0]) + 0.5) * scale / found.scale, found.labels.shape[0] - 1
        )
        cols = np.minimum(
            (np.arange(col0, col0 + crop.shape[1]) + 0.5) * scale / found.scale, found.labels.shape[1] - 1
        )
        coarse = found.labels[np.ix_(rows.astype(int), cols.astype(int))]  # each fine pixel's detected tissue
        mask = fine_tissue_mask(crop, threshold, params) & (coarse == label)
        shapes.append(mask_polygons(mask, (col0, row0), scale=scale, slide_wh=wh))
    return shapes


def _crop(image: np.ndarray, box: tuple[int, int, int, int], scale: float) -> tuple[np.ndarray, tuple[int, int]]:
    """The part of a mask or thumbnail (`scale` level-0 px per pixel) covering the level-0 `box`, 2 px wider on every
    side, and its (column, row) origin."""
    x, y, w, h = box
    col0, row0 = max(0, math.floor(x / scale) - 2), max(0, math.floor(y / scale) - 2)
    col1, row1 = math.ceil((x + w) / scale) + 2, math.ceil((y + h) / scale) + 2
    return image[row0:row1, col0:col1], (col0, row0)


def geometry(shape: Polygon | MultiPolygon) -> dict[str, Any]:
    """GeoJSON geometry of a polygon (see geometries)."""
    return geometries([shape])[0]


def geometries(shapes: Sequence[Polygon | MultiPolygon]) -> list[dict[str, Any]]:
    """GeoJSON geometries of (Multi)Polygons, coordinates rounded to 0.1 px, all in one pass (a heat map's cells are
    tens of thousands). They stay valid: where rounding would make a ring cross another, GEOS snaps that shape to
    the 0.1 px grid instead. An empty shape is a Polygon with no coordinates."""
    if not len(shapes):
        return []
    given = np.empty(len(shapes), dtype=object)
    given[:] = list(shapes)
    rounded = shapely.transform(given, lambda xy: np.round(xy, 1))  # vertices 0.5+ mask px apart: rarely invalid
    invalid = ~shapely.is_valid(rounded)
    if invalid.any():
        rounded[invalid] = shapely.set_precision(given[invalid], 0.1)
    kind, points, offsets = shapely.to_ragged_array(rounded)
    if kind == shapely.GeometryType.POLYGON:  # all single: one polygon per shape
        offsets = (*offsets, np.arange(len(rounded) + 1))
    ring_at, polygon_at, shape_at = (o.tolist() for o in offsets)
    coordinates = points.tolist()
    rings = [coordinates[a:b] for a, b in zip(ring_at[:-1], ring_at[1:])]
    polygons = [rings[a:b] for a, b in zip(polygon_at[:-1], polygon_at[1:])]
    single = shapely.get_type_id(rounded) == shapely.GeometryType.POLYGON
    out = []
    for first, last, one in zip(shape_at[:-1], shape_at[1:], single):
        parts = polygons[first:last]
        if one or not parts:
            out.append({"type": "Polygon", "coordinates": parts[0] if parts else []})
        else:
            out.append({"type": "MultiPolygon", "coordinates": parts})
    return out


def feature(
    shape: Polygon | MultiPolygon | dict[str, Any],
    name: str,
    *,
    object_type: str = "annotation",
    classification: str | None = None,
    colour: tuple[int, int, int] | None = None,
    measurements: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One QuPath object as a GeoJSON Feature: `properties.objectType` (annotation / detection), its name, an
    optional classification {name, color [r, g, b]} and measurements (a flat name -> number map). `shape`: a
    polygon, or its GeoJSON geometry already made (geometries, for many at once)."""
    properties: dict[str, Any] = {"objectType": object_type, "name": name}
    if classification is not None:
        properties["classification"] = {"name": classification, "color": list(colour or (0, 0, 0))}
    if measurements is not None:
        properties["measurements"] = measurements
    shape_geometry = shape if isinstance(shape, dict) else geometry(shape)
    return {"type": "Feature", "geometry": shape_geometry, "properties": properties}
