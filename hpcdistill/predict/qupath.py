"""Predictions as GeoJSON that QuPath imports (File > Import objects, or drag and drop onto the slide): a
FeatureCollection in level-0 pixel coordinates. One annotation per tissue, its outline traced from the tissue mask,
classified as its call with the class colour and the class probabilities as measurements; with heat maps, one
detection per CAM cell, so QuPath's measurement maps show the heat map natively. QuPath's conventions:
`properties.objectType` ("annotation" / "detection"), `classification` {name, color [r, g, b]}, and
`measurements` a flat name -> number map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hpcdistill.common.files import atomic_write_json
from hpcdistill.predict.cam import TissueMap
from hpcdistill.slides.tissue import class_colour


def outline(mask: np.ndarray, scale: float, slide_wh: tuple[int, int]) -> list[list[float]]:
    """The closed outer ring of a thumbnail mask (the largest contour at its 0.5 level), in level-0 pixels."""
    import contourpy

    padded = np.pad(mask.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)

    def area(ring: np.ndarray) -> float:
        x, y = ring[:, 0], ring[:, 1]
        return abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) / 2

    ring = max(lines, key=area) - 0.5  # padded index -> thumbnail pixel centre (index - 1 + 0.5)
    points = np.clip(ring * scale, 0, [slide_wh[0], slide_wh[1]]).round(1)
    points = points[np.r_[True, np.any(np.diff(points, axis=0) != 0, axis=1)]]  # no repeated vertices
    closed = np.vstack([points, points[:1]]) if not np.array_equal(points[0], points[-1]) else points
    return closed.tolist()


def _feature(
    ring: list[list[float]], object_type: str, name: str, classes: list[str], call: str, probs: list[float]
) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": object_type,
            "name": name,
            "classification": {"name": call, "color": list(class_colour(classes.index(call)))},
            "measurements": {f"p_{c}": float(p) for c, p in zip(classes, probs)},
        },
    }


def cell_features(t: int, cam: TissueMap, classes: list[str]) -> list[dict[str, Any]]:
    """One detection per CAM cell of tissue t (cells outside every window, NaN, are left out)."""
    probs = cam.probabilities()
    features = []
    for i in range(probs.shape[1]):
        for j in range(probs.shape[2]):
            cell = probs[:, i, j]
            if np.isnan(cell).any():
                continue
            x0, x1, y0, y1 = (int(v) for v in (cam.x_edges[j], cam.x_edges[j + 1], cam.y_edges[i], cam.y_edges[i + 1]))
            ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
            features.append(
                _feature(
                    ring, "detection", f"tissue {t} cell {i},{j}", classes, classes[int(cell.argmax())], cell.tolist()
                )
            )
    return features


def write_geojson(
    path: Path,
    found: Any,
    tissues: list[dict],
    classes: list[str],
    slide_wh: tuple[int, int],
    maps: list[TissueMap] | None = None,
) -> Path:
    """`path`: the tissues as classified annotations, and the CAM cells as detections when `maps` are given."""
    features = [
        _feature(
            outline(found.mask(t["tissue"]), found.scale, slide_wh),
            "annotation",
            f"tissue {t['tissue']}",
            classes,
            t["pred"],
            t["probs"],
        )
        for t in tissues
    ]
    for t, cam in enumerate(maps or []):
        features += cell_features(t, cam, classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"type": "FeatureCollection", "features": features})
    return path
