"""Predictions as GeoJSON that QuPath imports (File > Import objects, or drag and drop onto the slide): a
FeatureCollection in level-0 pixel coordinates. One annotation per tissue, its outline (slides.outlines: every
contour with its holes, as `shard` writes them), classified as its call with the class colour and the class
probabilities as measurements; with heat maps, one detection per CAM cell clipped to the tissue, so QuPath's
measurement maps show the heat map natively. QuPath's conventions: `properties.objectType` ("annotation" /
"detection"), `classification` {name, color [r, g, b]}, and `measurements` a flat name -> number map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import shapely

from hpcdistill.common.files import atomic_write_json
from hpcdistill.predict.cam import TissueMap
from hpcdistill.slides.outlines import feature, geometries
from hpcdistill.slides.tissue import class_colour


def _classified(shape: Any, object_type: str, name: str, classes: list[str], call: str, probs: list[float]) -> dict:
    colour = class_colour(classes.index(call))
    measurements = {f"p_{c}": float(p) for c, p in zip(classes, probs)}
    return feature(shape, name, object_type=object_type, classification=call, colour=colour, measurements=measurements)


def cell_features(t: int, cam: TissueMap, classes: list[str], outline: Any) -> list[dict[str, Any]]:
    """One detection per CAM cell of tissue t, clipped to the tissue's outline: a cell on glass is left out, as is
    one outside every window (NaN); its measurements are the whole cell's. Vectorised: only the cells on the
    outline's edge are clipped (a teacher's slide has tens of thousands of cells)."""
    probs = cam.probabilities()
    rows, cols = np.nonzero(~np.isnan(probs).any(axis=0))  # row-major, as the cells are read
    x0, x1, y0, y1 = cam.x_edges[cols], cam.x_edges[cols + 1], cam.y_edges[rows], cam.y_edges[rows + 1]
    shapes = shapely.box(x0, y0, x1, y1)
    shapely.prepare(outline)  # in place: many cells test against one outline
    inside = shapely.contains_properly(outline, shapes)
    edge = ~inside & shapely.intersects(outline, shapes)
    shapes[edge] = _clipped(outline, np.column_stack([x0, y0, x1, y1])[edge])
    keep = inside | edge & (shapely.area(shapes) > 0)
    features = []
    for geometry, i, j in zip(geometries(shapes[keep]), rows[keep], cols[keep]):
        cell = probs[:, i, j].tolist()
        call = classes[int(np.argmax(cell))]
        features.append(_classified(geometry, "detection", f"tissue {t} cell {i},{j}", classes, call, cell))
    return features


def _clipped(outline: Any, cells: np.ndarray) -> list[Any]:
    """The outline within each cell (x0, y0, x1, y1): cut to the cell's row band first, so each cell's intersection
    reads the band's few vertices, not the whole outline's. (GEOS' clip_by_rect would be quicker, but it drops
    parts of polygons with holes.)"""
    left, right = float(cells[:, 0].min()), float(cells[:, 2].max())
    rows = {(y0, y1): None for y0, y1 in cells[:, [1, 3]].tolist()}
    bands = dict(zip(rows, shapely.intersection(outline, [shapely.box(left, a, right, b) for a, b in rows])))
    in_band = np.array([bands[y0, y1] for y0, y1 in cells[:, [1, 3]].tolist()], dtype=object)
    pieces = shapely.make_valid(shapely.intersection(in_band, shapely.box(*cells.T)))
    return [_polygonal_union(g) for g in pieces]


def _polygonal_union(shape: Any) -> Any:
    """The polygons of a clipped cell as one shape (clipping may leave lines or points along an edge)."""
    parts = [g for g in getattr(shape, "geoms", [shape]) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def write_geojson(
    path: Path, outlines: list[Any], tissues: list[dict], classes: list[str], maps: list[TissueMap] | None = None
) -> Path:
    """`path`: the tissues (their outlines, slides.outlines) as classified annotations, and the CAM cells, clipped
    to them, as detections when `maps` are given."""
    features = [
        _classified(outlines[t["tissue"]], "annotation", f"tissue {t['tissue']}", classes, t["pred"], t["probs"])
        for t in tissues
    ]
    for t, cam in enumerate(maps or []):
        features += cell_features(t, cam, classes, outlines[t])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"type": "FeatureCollection", "features": features})
    return path
