"""Your own regions through the real CLI: shard's outlines edited as a user would in QuPath and used again (--rois
inside), a pen mark removed (--roi-mode outside), polygons valid with their holes and detections on tissue, and a
slide labelled by its regions (--roi-labels) training a teacher."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from shapely.geometry import mapping, shape
from slide_fixtures import write_pyramid_tiff
from train_helpers import error_line

from hpcdistill.cli import main
from hpcdistill.synthetic import dataset as synthetic

SHARD = ["--mags", "10,2.5", "--max-size", "96", "--no-progress"]  # 96 px at 10x: tissues cut into several windows


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("regions") / "a.tiff"
    synthetic.write_slide(path, synthetic.SlideSpec(4096, 3072, fmt="tiff", base_mag=40, class_id=0, seed=3, tissues=3))
    return path


def windows(shards: Path) -> list[tuple[int, tuple[int, ...]]]:
    """(tissue, level-0 box) of every sample the sharder wrote."""
    found = []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    meta = json.load(archive.extractfile(member))
                    found.append((meta["tissue"], tuple(meta["box_l0"])))
    return sorted(found)


def outlines(path: Path) -> dict[str, dict]:
    return {f["properties"]["name"]: f for f in json.loads(path.read_text())["features"]}


def test_outlines_edited_in_qupath_shard_exactly_the_remaining_tissue(slide, tmp_path):
    assert main.main(["shard", str(slide), "--out", str(tmp_path / "first"), *SHARD]) == 0
    before = windows(tmp_path / "first")
    drawn = outlines(tmp_path / "first" / "qc" / "a.geojson")
    assert sorted(drawn) == ["t000", "t001", "t002"] and sorted({t for t, _ in before}) == [0, 1, 2]
    middle = [box for t, box in before if t == 1][4]  # the centre of tissue 1's 3x3 windows
    x, y, w, h = middle
    hole = shapely.box(x - 8, y - 8, x + w + 8, y + h + 8)  # 2 thumbnail px around it
    del drawn["t002"]  # as a user would: delete one tissue, cut a hole into another
    drawn["t001"]["geometry"] = mapping(shape(drawn["t001"]["geometry"]).difference(hole))
    (tmp_path / "rois").mkdir()
    (tmp_path / "rois" / "a.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": list(drawn.values())})
    )
    assert (
        main.main(["shard", str(slide), "--out", str(tmp_path / "again"), *SHARD, "--rois", str(tmp_path / "rois")])
        == 0
    )
    after = windows(tmp_path / "again")
    assert after == [(t, box) for t, box in before if t != 2 and box != middle]
    assert not [box for _, box in after if shapely.box(box[0], box[1], box[0] + box[2], box[1] + box[3]).within(hole)]
    record = json.loads((tmp_path / "again" / "manifest.json").read_text())["slides"]["a"]
    assert record["roi"] == "a.geojson (inside)" and record["tissues"] == 2


def with_pen_mark(slide: Path, out: Path) -> tuple[Path, shapely.Polygon]:
    """The slide with a dark marker stroke drawn on its glass, and the region a pathologist would draw around it."""
    image = tifffile.imread(slide, level=0)
    x0, y0, x1, y1 = 3200, 300, 3900, 420
    assert (image[y0:y1, x0:x1] > 200).all()  # glass: the stroke touches no tissue
    image[y0:y1, x0:x1] = (35, 30, 40)
    write_pyramid_tiff(out, image, mpp=0.25, subifds=False)
    return out, shapely.box(x0 - 40, y0 - 40, x1 + 40, y1 + 40)


def test_roi_mode_outside_removes_exactly_the_samples_under_a_pen_mark(slide, tmp_path):
    marked, mark = with_pen_mark(slide, tmp_path / "a.tiff")
    assert main.main(["shard", str(marked), "--out", str(tmp_path / "all"), *SHARD]) == 0
    every = windows(tmp_path / "all")
    under = [box for _, box in every if shapely.box(box[0], box[1], box[0] + box[2], box[1] + box[3]).intersects(mark)]
    assert under, "the marker was not taken for tissue: the test would show nothing"
    (tmp_path / "a.geojson").write_text(json.dumps(region(mark, "Pen")))
    rois = ["--rois", str(tmp_path / "a.geojson"), "--roi-mode", "outside"]
    assert main.main(["shard", str(marked), "--out", str(tmp_path / "clean"), *SHARD, *rois]) == 0
    assert [box for _, box in windows(tmp_path / "clean")] == [box for _, box in every if box not in under]


def test_polygons_are_valid_keep_holes_and_detections_stay_on_tissue(slide, tiny_teacher, tmp_path):
    assert main.main(["shard", str(slide), "--out", str(tmp_path / "s"), *SHARD]) == 0
    shard_shapes = [shape(f["geometry"]) for f in outlines(tmp_path / "s" / "qc" / "a.geojson").values()]
    assert all(s.is_valid and not s.is_empty for s in shard_shapes)
    assert sum(len(p.interiors) for s in shard_shapes for p in getattr(s, "geoms", [s])) > 0  # lumens kept
    assert main.main(["predict", str(tiny_teacher), str(slide), "--out", str(tmp_path / "p"), "--heatmap"]) == 0
    features = json.loads((tmp_path / "p" / "geojson" / "a.geojson").read_text())["features"]
    tissues = {
        f["properties"]["name"]: shape(f["geometry"]) for f in features if f["properties"]["objectType"] == "annotation"
    }
    cells = [f for f in features if f["properties"]["objectType"] == "detection"]
    assert cells and all(shape(f["geometry"]).is_valid for f in features)
    for cell in cells:
        tissue = tissues[" ".join(cell["properties"]["name"].split()[:2])]
        outside = shape(cell["geometry"]).difference(tissue.buffer(0.2))  # coordinates are rounded to 0.1 px
        assert outside.is_empty, (cell["properties"]["name"], outside.area)
    cell_l0 = json.loads(next((tmp_path / "p" / "heatmaps").glob("*.json")).read_text())["cell_l0"]
    widths = [shapely.box(*shape(c["geometry"]).bounds).bounds for c in cells]
    # a whole cell is stride x the window's level-0 px per input px: the stated size, within the <1% by which a
    # window's input size is rounded to whole pixels (the edges are no longer rounded: 65 px cells said to be 64)
    assert max(x1 - x0 for x0, _, x1, _ in widths) == pytest.approx(cell_l0, rel=0.01)


def two_class_slide(path: Path, seed: int) -> list[dict]:
    """A slide whose left half is class 0 tissue and right half class 1, and its two classified regions."""
    halves = []
    for cls in (0, 1):
        part = path.parent / f"{path.stem}-{cls}.tiff"
        synthetic.write_slide(
            part, synthetic.SlideSpec(2048, 3072, fmt="tiff", base_mag=40, class_id=cls, seed=seed + cls, tissues=2)
        )
        halves.append(tifffile.imread(part, level=0))
    write_pyramid_tiff(path, np.concatenate(halves, axis=1), mpp=0.25, subifds=False)
    return [region(shapely.box(0, 0, 2048, 3072), "normal"), region(shapely.box(2048, 0, 4096, 3072), "tumor")]


def region(polygon: shapely.Polygon, name: str) -> dict:
    """A classified annotation as QuPath exports it."""
    return {"type": "Feature", "geometry": mapping(polygon), "properties": {"classification": {"name": name}}}


def test_roi_labels_train_a_teacher_on_slides_labelled_by_region(tmp_path, capsys):
    slides, rois = tmp_path / "slides", tmp_path / "rois"
    slides.mkdir(), rois.mkdir()
    rows = [("r1", "p1", "", "train"), ("r2", "p2", "", "train"), ("r3", "p3", "", "val")]
    for i, (name, *_rest) in enumerate(rows):
        regions = two_class_slide(slides / f"{name}.tiff", seed=10 * i)
        (rois / f"{name}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": regions}))
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("slide", "patient", "label", "split"), *rows])
    shards = tmp_path / "shards"
    argv = ["shard", *map(str, sorted(slides.glob("r?.tiff"))), "--labels", str(tmp_path / "labels.csv")]
    argv += ["--classes", "normal,tumor", "--mags", "10,2.5", "--no-progress", "--rois", str(rois), "--roi-labels"]
    assert main.main([*argv, "--out", str(shards)]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    for split in ("train", "val"):
        histogram = manifest["splits"][split]["class_histogram"]
        assert histogram["normal"] > 0 and histogram["tumor"] > 0, (split, histogram)
    tiny = ["model.arch=resnet10", "model.width=8", "model.groups=4", "model.num_classes=2", "train.epochs=1"]
    tiny += ["data.epoch_samples=4", f"data.shards={shards}", f"run.out_dir={tmp_path / 'runs'}"]
    assert main.main(["train", "configs/demo/teacher.yaml", *tiny, "train.grad_accum=1"]) == 0
    assert (tmp_path / "runs" / "teacher-10x" / "best.pt").is_file()
    conflict = json.loads((rois / "r1.geojson").read_text())
    conflict["features"][1]["geometry"] = mapping(shapely.box(1000, 0, 4096, 3072))  # tumor over normal tissue
    (rois / "r1.geojson").write_text(json.dumps(conflict))
    capsys.readouterr()
    assert main.main([*argv, "--out", str(tmp_path / "other")]) == 2
    assert "lies under regions of classes 'normal' and 'tumor'; one tissue, one label" in error_line(capsys)
