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
from hpcdistill.slides.outlines import feature
from hpcdistill.slides.tissue import class_colour


def _classified(shape: Any, object_type: str, name: str, classes: list[str], call: str, probs: list[float]) -> dict:
    colour = class_colour(classes.index(call))
    measurements = {f"p_{c}": float(p) for c, p in zip(classes, probs)}
    return feature(shape, name, object_type=object_type, classification=call, colour=colour, measurements=measurements)


def cell_features(t: int, cam: TissueMap, classes: list[str], outline: Any) -> list[dict[str, Any]]:
    """One detection per CAM cell of tissue t, clipped to the tissue's outline: a cell on glass is left out, as is
    one outside every window (NaN); its measurements are the whole cell's."""
    probs = cam.probabilities()
    shapely.prepare(outline)  # in place: many cells test against one outline
    features = []
    for i in range(probs.shape[1]):
        for j in range(probs.shape[2]):
            cell = probs[:, i, j]
            square = shapely.box(cam.x_edges[j], cam.y_edges[i], cam.x_edges[j + 1], cam.y_edges[i + 1])
            if np.isnan(cell).any() or not outline.intersects(square):
                continue
            clipped = shapely.make_valid(square.intersection(outline))
            parts = [g for g in getattr(clipped, "geoms", [clipped]) if g.geom_type in ("Polygon", "MultiPolygon")]
            if not parts or shapely.union_all(parts).area == 0:
                continue
            call = classes[int(cell.argmax())]
            shape = shapely.union_all(parts)
            features.append(_classified(shape, "detection", f"tissue {t} cell {i},{j}", classes, call, cell.tolist()))
    return features


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
