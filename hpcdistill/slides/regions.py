"""Regions a pathologist drew, as QuPath exports them: GeoJSON in level-0 pixel coordinates (a FeatureCollection, a
Feature, or a JSON list of Features), Polygon or MultiPolygon with holes, each optionally classified. Read and
validated with shapely; applied to the tissue mask on the thumbnail (`RoiOptions.mode`: keep tissue inside the
regions, remove it, or ignore them), and, with region labels, giving each tissue its class.

Which file belongs to which slide: `--rois` names a folder holding `<slide id>.geojson` (or `.json`, or QuPath's
`<image file name>.geojson`), or one such file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.common.typed_tree import short

ROI_MODES = ("inside", "outside", "ignore")
ROI_MISSING = ("skip", "tissue")
MAX_ROI_BYTES = 64 * 2**20  # a region file larger than this is not a hand-drawn annotation


class RegionError(HpcdistillError):
    """A region file that cannot be used as given."""


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
            return next((root / n for n in names if (root / n).is_file()), None)
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
    """A slide's regions: every region, and each classified one with its class name."""

    source: str
    shapes: list[Polygon | MultiPolygon]
    classes: list[str | None]

    def mask(self, shape: tuple[int, int], scale: float, name: str | None = None) -> np.ndarray:
        """Which thumbnail pixels (centres, `scale` level-0 px each) lie in the regions (of class `name`)."""
        chosen = [s for s, c in zip(self.shapes, self.classes) if name is None or c == name]
        area = shapely.union_all(chosen) if chosen else Polygon()
        rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
        return shapely.contains_xy(area, (cols + 0.5) * scale, (rows + 0.5) * scale)


def read_regions(path: str | Path) -> Regions:
    """A QuPath GeoJSON file's polygons (made valid) and classifications; refused in one line naming the file and
    the feature when it holds no polygon, another geometry, or is not JSON."""
    path = Path(path)
    if path.stat().st_size > MAX_ROI_BYTES:
        raise RegionError(f"{path}: larger than {MAX_ROI_BYTES // 2**20} MiB: not a region file")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise RegionError(f"{path}: not GeoJSON ({err})") from None
    features = _features(data, path)
    shapes, classes = [], []
    for i, feature in enumerate(features):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind not in ("Polygon", "MultiPolygon"):
            raise RegionError(f"{path}: feature {i}: geometry {short(kind)}: regions are Polygon or MultiPolygon")
        try:
            shape = shapely.make_valid(shapely.geometry.shape(geometry))
        except (ValueError, TypeError, shapely.errors.GEOSException) as err:
            raise RegionError(f"{path}: feature {i}: not a polygon ({err})") from None
        parts = [g for g in getattr(shape, "geoms", [shape]) if isinstance(g, (Polygon, MultiPolygon))]
        if parts:
            shapes.append(shapely.union_all(parts))
            classes.append(_class_name(feature.get("properties") or {}))
    if not shapes:
        raise RegionError(f"{path}: holds no polygon")
    return Regions(str(path), shapes, classes)


def _features(data: Any, path: Path) -> list[Any]:
    if isinstance(data, list):  # QuPath before 0.3 exports a bare list of features
        return data
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "FeatureCollection" and isinstance(data.get("features"), list):
        return data["features"]
    if kind == "Feature":
        return [data]
    raise RegionError(f"{path}: a {short(kind)}: expected a GeoJSON FeatureCollection or Feature")


def _class_name(properties: dict[str, Any]) -> str | None:
    """QuPath's classification: {"name": ..., "color": [...]}, or a plain name."""
    value = properties.get("classification")
    if isinstance(value, dict):
        value = value.get("name")
    return value if isinstance(value, str) and value else None


class LabelConflict(RegionError):
    """One tissue under regions of two classes: which label it has cannot be told."""


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
