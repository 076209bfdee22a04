"""Regions a pathologist drew, as QuPath exports them: GeoJSON in level-0 pixel coordinates (a FeatureCollection, a
Feature, or a JSON list of Features), Polygon or MultiPolygon with holes, each optionally classified. Applied to the
tissue mask on the thumbnail (`RoiOptions.mode`: keep tissue inside the regions, remove it, or ignore them), and,
with region labels, giving each tissue its class.

A region file is untrusted input, so every cost is bounded before it is paid (common/limits.py): the bytes read, the
JSON nesting, the vertices (counted in the raw text before parsing), and the work of the mask. The mask is drawn by a
scanline fill at the thumbnail's resolution, not by GEOS: an even-odd fill of each polygon's rings (a hole is a hole;
a self-crossing ring is read as GEOS' `make_valid` reads it, by parity) and the union over polygons, in time linear in
the vertices, the rows each edge crosses and the pixels, whatever the shape (a GEOS validity check of a spiky
polygon is quadratic: 170 s at one million vertices).

Which file belongs to which slide: `--rois` names a folder holding `<slide id>.geojson` (or `.json`, or QuPath's
`<image file name>.geojson`), or one such file."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcdistill.common.errors import LabelConflict, RegionError
from hpcdistill.common.limits import json_depth_ok, limit, raise_hint, read_bounded
from hpcdistill.common.typed_tree import short

ROI_MODES = ("inside", "outside", "ignore")
ROI_MISSING = ("skip", "tissue")


@dataclass(frozen=True)
class RoiOptions:
    """How regions change the tissue (everything here changes the shards' bytes, so it is fingerprinted)."""

    path: str | None = None  # a folder of per-slide GeoJSON files, or one file; None: no regions
    mode: str = "inside"
    missing: str = "skip"  # a slide without a region file: skip it, or use its detected tissue
    labels: bool = False  # tissue labels come from the regions' classifications

    def __post_init__(self) -> None:
        if self.mode not in ROI_MODES:
            raise RegionError(f"--roi-mode {self.mode!r}: one of {', '.join(ROI_MODES)}")
        if self.missing not in ROI_MISSING:
            raise RegionError(f"--roi-missing {self.missing!r}: one of {', '.join(ROI_MISSING)}")
        if self.labels and (self.path is None or self.mode != "inside"):
            raise RegionError("--roi-labels: needs --rois and --roi-mode inside (the labelled regions are the tissue)")

    def file_for(self, slide_id: str, slide_file: str) -> Path | None:
        """The region file of a slide, or None."""
        if self.path is None:
            return None
        root = Path(self.path)
        names = [f"{slide_id}.geojson", f"{slide_id}.json", f"{slide_file}.geojson"]
        if root.is_dir():
            # any entry by that name: a FIFO or a device there is refused as what it is, not taken for "no file"
            return next((root / n for n in names if os.path.lexists(root / n) and not (root / n).is_dir()), None)
        return root if root.name in names else None

    def regions_for(self, slide_path: str | Path, slide_id: str) -> Regions | None:
        """The slide's regions; None without --rois, or without its file under --roi-missing tissue. Without its file
        under --roi-missing skip: refused in one line (that slide's skip reason in `shard` and `predict`)."""
        path = self.file_for(slide_id, Path(slide_path).name)
        if path is not None:
            return read_regions(path)
        if self.path is not None and self.missing == "skip":
            raise RegionError(f"{slide_path}: no region file for {slide_id} in {self.path} (--roi-missing skip)")
        return None


@dataclass(frozen=True)
class Regions:
    """A slide's regions: each polygon (its rings, exterior first, as (n, 2) level-0 x, y arrays) with the class of
    the feature it came from (None: unclassified)."""

    source: str
    polygons: list[list[np.ndarray]]
    classes: list[str | None]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of every vertex, level-0 px."""
        points = np.concatenate([rings[0] for rings in self.polygons])
        (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)

    def mask(self, shape: tuple[int, int], scale: float, name: str | None = None) -> np.ndarray:
        """Which thumbnail pixels (centres, `scale` level-0 px each) lie in the regions (of class `name`); refused in
        one line when drawing them would pass the `region_raster_work` limit."""
        from hpcdistill.slides.scanline import TooIntricate, fill

        chosen = [p for p, c in zip(self.polygons, self.classes) if name is None or c == name]
        try:
            return fill(chosen, shape, scale, limit("region_raster_work"))
        except TooIntricate as err:
            raise RegionError(f"{self.source}: too intricate: {err} ({raise_hint('region_raster_work')})") from None

    def check_on_slide(self, width: int, height: int) -> None:
        """Refuse regions that lie wholly outside the slide's level-0 bounds (drawn on another image, or in other
        units)."""
        x0, y0, x1, y1 = self.bounds
        if x1 < 0 or y1 < 0 or x0 > width or y0 > height:
            raise RegionError(
                f"{self.source}: its regions span x {x0:.6g}..{x1:.6g}, y {y0:.6g}..{y1:.6g}, wholly outside the "
                f"slide's {width}x{height} level-0 px: drawn on another image, or not in level-0 pixels?"
            )


def read_regions(path: str | Path) -> Regions:
    """A QuPath GeoJSON file's polygons and classifications; refused in one line naming the file (and the feature)
    when it is not a regular file, is too large, too deep or has too many vertices (all checked before parsing),
    holds no polygon, another geometry, or is not JSON."""
    path = Path(path)
    data = read_bounded(path, "region_bytes", RegionError)
    vertices = data.count(b"[")  # every position is [x, y]: an upper bound on the vertices, counted at C speed
    if vertices > limit("region_vertices"):
        raise RegionError(
            f"{path}: about {vertices:,} vertices, more than a region file may hold ({raise_hint('region_vertices')}; "
            "or simplify the annotation in QuPath)"
        )
    json_depth_ok(data, str(path), RegionError)
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise RegionError(f"{path}: not GeoJSON ({short(str(err), 120)})") from None
    polygons, classes = [], []
    for i, feature in enumerate(_features(parsed, path)):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind not in ("Polygon", "MultiPolygon"):
            raise RegionError(f"{path}: feature {i}: geometry {short(kind)}: regions are Polygon or MultiPolygon")
        coordinates = geometry.get("coordinates")
        parts = [coordinates] if kind == "Polygon" else coordinates
        if not isinstance(parts, list):
            raise RegionError(f"{path}: feature {i}: {kind} coordinates are not a list")
        name = _class_name(feature.get("properties") or {})
        for rings in parts:
            polygons.append(_rings(rings, f"{path}: feature {i}"))
            classes.append(name)
    if not polygons:
        raise RegionError(f"{path}: holds no polygon")
    return Regions(str(path), polygons, classes)


def _rings(rings: Any, label: str) -> list[np.ndarray]:
    """A GeoJSON polygon's rings as (n, 2) float arrays; refused unless each holds at least 3 finite [x, y]."""
    if not isinstance(rings, list) or not rings:
        raise RegionError(f"{label}: not a polygon (expected a list of rings)")
    out = []
    for ring in rings:
        points = _positions(ring)
        if points is None or len(points) < 3:
            raise RegionError(f"{label}: not a polygon (a ring is not a list of at least 3 [x, y] positions)")
        if not np.isfinite(points).all():
            raise RegionError(f"{label}: not a polygon (a coordinate is not a finite number)")
        out.append(points)
    return out


def _positions(ring: Any) -> np.ndarray | None:
    """A ring's [x, y] (or [x, y, z]) positions as an (n, 2) array; None if it is not such a list."""
    if not isinstance(ring, list):
        return None
    try:
        points = np.asarray(ring, dtype=np.float64)  # one C pass when every position has the same length
    except (TypeError, ValueError):
        try:  # mixed [x, y] and [x, y, z]
            points = np.asarray([p[:2] for p in ring], dtype=np.float64)
        except (TypeError, ValueError, IndexError):
            return None
    return points[:, :2] if points.ndim == 2 and points.shape[1] >= 2 else None


_JSON_KINDS = {
    dict: "JSON object",
    list: "JSON list",
    str: "JSON string",
    bool: "JSON boolean",
    float: "JSON number",
    int: "JSON number",
    type(None): "JSON null",
}


def _features(data: Any, path: Path) -> list[Any]:
    if isinstance(data, list):  # QuPath before 0.3 exports a bare list of features
        return data
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "FeatureCollection" and isinstance(data.get("features"), list):
        return data["features"]
    if kind == "Feature":
        return [data]
    what = f"an object of type {short(kind)}" if isinstance(data, dict) else f"a {_JSON_KINDS[type(data)]}"
    raise RegionError(f"{path}: {what}: expected a GeoJSON FeatureCollection or Feature")


def _class_name(properties: dict[str, Any]) -> str | None:
    """QuPath's classification: {"name": ..., "color": [...]}, or a plain name."""
    value = properties.get("classification") if isinstance(properties, dict) else None
    if isinstance(value, dict):
        value = value.get("name")
    return value if isinstance(value, str) and value else None


def label_tissues(found: Any, regions: Regions, classes: list[str]) -> Any:
    """`found` (slides.windows.TissueWindows) with each tissue's class from the classified regions it lies in; a
    tissue under no classified region goes. Two classes under one tissue, or a class not in `classes`, is refused
    in one line."""
    from hpcdistill.slides.windows import keep_tissues

    names = sorted({c for c in regions.classes if c})
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise RegionError(f"{regions.source}: region class {unknown[0]!r} is not in --classes ({', '.join(classes)})")
    masks = {name: regions.mask(found.labels.shape, found.scale, name) for name in names}
    tissue_classes = []
    for t in range(len(found.boxes)):
        under = [name for name in names if (found.mask(t) & masks[name]).any()]
        if len(under) > 1:
            raise LabelConflict(
                f"{regions.source}: tissue t{t:03d} lies under regions of classes {under[0]!r} and {under[1]!r}; "
                "one tissue, one label: split the region or leave one class out"
            )
        tissue_classes.append(under[0] if under else None)
    labelled = dataclasses.replace(found, classes=tissue_classes)
    return keep_tissues(labelled, [ws if c else [] for ws, c in zip(found.windows, tissue_classes)])
