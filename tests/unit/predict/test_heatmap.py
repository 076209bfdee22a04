"""Class-activation heat maps and the QuPath GeoJSON: exact CAMs for every stem, and a real trained teacher on a
real two-class synthetic slide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import shapely.geometry
import shapely.validation
import torch
from PIL import Image

from hpcdistill.config.schema import STEMS
from hpcdistill.models.resnet import build_model
from hpcdistill.predict.cam import STEM_STRIDE, WindowMap, cam_logits, cell_edges, tissue_map
from hpcdistill.slides.tissue import class_colour

HALF = 768  # the two-class slide is 1536 px wide: left tissue one class, right tissue another


@pytest.mark.parametrize("stem", STEMS)
def test_cam_mean_is_the_logit_for_every_stem(stem):
    torch.manual_seed(0)
    model = build_model("resnet10", 3, width=16, groups=4, stem=stem).eval()
    for height, width in ((77, 53), (64, 64), (130, 41)):
        with torch.no_grad():
            features, logits = model(torch.randn(1, 3, height, width))
        cam = cam_logits(model, features)
        assert cam.shape[2:] == (-(-height // STEM_STRIDE[stem]), -(-width // STEM_STRIDE[stem]))
        assert torch.allclose(cam.mean(dim=(2, 3)), logits, atol=1e-4)


def test_cells_tile_the_window_and_overlapping_windows_blend():
    edges = cell_edges(1000, 400, 100, 4, 32)  # 100 px seen by the model, 4 cells of 32 px, on 400 level-0 px
    assert edges.tolist() == [1000, 1128, 1256, 1384, 1400]
    one = np.ones((2, 2, 2), np.float32)
    a = WindowMap(one, np.array([0, 10, 20]), np.array([0, 10, 20]))
    b = WindowMap(3 * one, np.array([10, 20, 30]), np.array([0, 10, 20]))
    assert tissue_map([a]).logits is a.logits  # one window: its own map, exactly
    blended = tissue_map([a, b])
    assert blended.box == (0, 0, 30, 20) and blended.logits[0].tolist() == [[1, 2, 3], [1, 2, 3]]


@pytest.fixture(scope="module")
def two_class_teacher(tmp_path_factory) -> dict:
    """A demo teacher (halfres stem) trained on two synthetic classes, and a slide with one of each side by side."""
    from hpcdistill.config.loading import load_config
    from hpcdistill.shards.sharding import ShardParams, run_sharding
    from hpcdistill.synthetic.dataset import write_dataset, write_two_class_slide
    from hpcdistill.synthetic.specs import DatasetSpec
    from hpcdistill.train import loop

    root = tmp_path_factory.mktemp("two_class")
    _, labels = write_dataset(
        root / "slides",
        DatasetSpec(
            slides_per_split={"train": 8, "val": 2, "test": 0}, classes=2, aux1=0, aux2=0, size=(1536, 1152), seed=5
        ),
    )
    run_sharding(
        [root / "slides"], root / "shards", labels_csv=str(labels), params=ShardParams(mags=(10.0,)), progress=False
    )
    cfg = load_config(
        "configs/demo/teacher.yaml",
        [
            f"data.shards={root / 'shards'}",
            f"run.out_dir={root}",
            "model.num_classes=2",
            "train.epochs=20",
            "data.epoch_samples=32",
            "train.grad_accum=1",
            "log.progress=false",
        ],
    )
    summary = loop.run(cfg)
    slide = write_two_class_slide(root / "two.tiff", 2 * HALF, 768, 0, 1, seed=9)  # normal | duodenitis nuclei
    return {"model": Path(summary["best_path"]), "slide": slide, "root": root}


@pytest.fixture(scope="module")
def predicted(two_class_teacher, tmp_path_factory) -> dict:
    from hpcdistill.predict.prediction import predict_slides

    out = tmp_path_factory.mktemp("heat")
    summary = predict_slides(two_class_teacher["model"], [two_class_teacher["slide"]["path"]], out, heatmap=True)
    return {"out": out, "summary": summary, "result": summary["slides"][0]}


def test_heat_map_favours_each_sides_own_class(predicted):
    result, classes = predicted["result"], predicted["summary"]["classes"]
    assert classes == ["duodenitis", "normal"]  # sorted labels; the left tissue has normal nuclei
    meta = json.loads(Path(result["heatmap_arrays"]).read_text())
    assert len(meta["tissues"]) == len(result["tissues"]) == 2
    for entry, tissue in zip(meta["tissues"], result["tissues"]):
        logits = np.load(Path(result["heatmap_arrays"]).parent / entry["array"])
        assert logits.dtype == np.float32 and list(logits.shape) == entry["shape"]
        mean = logits.reshape(len(classes), -1).mean(axis=1)  # one window per tissue: the model's logit, exactly
        assert np.allclose(np.exp(mean) / np.exp(mean).sum(), tissue["probs"], atol=1e-4)
        cells = np.exp(logits - logits.max(axis=0)) / np.exp(logits - logits.max(axis=0)).sum(axis=0)
        own = "normal" if tissue["box_l0"][0] + tissue["box_l0"][2] / 2 < HALF else "duodenitis"
        assert tissue["pred"] == own and cells[classes.index(own)].mean() > 0.5
    with Image.open(result["heatmap"]) as img:  # the overlay's legend and tissue frames in each class's colour
        pixels = np.asarray(img.convert("RGB"))
    for index in range(len(classes)):
        assert (pixels == np.array(class_colour(index), np.uint8)).all(axis=-1).sum() > 20, classes[index]


def test_geojson_is_what_qupath_imports(predicted):
    result, classes = predicted["result"], predicted["summary"]["classes"]
    collection = json.loads(Path(result["geojson"]).read_text())  # a plain GeoJSON reader round trip
    assert collection["type"] == "FeatureCollection"
    annotations = [f for f in collection["features"] if f["properties"]["objectType"] == "annotation"]
    detections = [f for f in collection["features"] if f["properties"]["objectType"] == "detection"]
    assert len(annotations) == len(result["tissues"]) and detections
    for feature in collection["features"]:  # the fields QuPath's GeoJSON reader uses, and valid geometry
        props = feature["properties"]
        assert feature["type"] == "Feature" and feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
        outline = shapely.geometry.shape(feature["geometry"])
        assert outline.is_valid and outline.area > 0, shapely.validation.explain_validity(outline)
        assert shapely.geometry.box(0, 0, 2 * HALF, 768).covers(outline)
        assert props["classification"]["name"] in classes and len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) == {f"p_{c}" for c in classes}
        assert all(isinstance(v, float) for v in props["measurements"].values())
    for annotation, tissue in zip(annotations, result["tissues"]):  # the outline lies inside its (padded) box
        x, y, w, h = tissue["box_l0"]
        outline = shapely.geometry.shape(annotation["geometry"])
        assert shapely.geometry.box(x - 1, y - 1, x + w + 1, y + h + 1).covers(outline)
        assert outline.area > 0.2 * w * h  # the tissue, not a speck of it
        assert annotation["properties"]["classification"]["name"] == tissue["pred"]
    cells = [shapely.geometry.shape(f["geometry"]) for f in detections]  # a grid: cells never overlap
    assert shapely.union_all(cells).area == pytest.approx(sum(c.area for c in cells))
    meta = json.loads(Path(result["heatmap_arrays"]).read_text())
    outlines = {f["properties"]["name"]: shapely.geometry.shape(f["geometry"]) for f in annotations}
    for t, entry in enumerate(meta["tissues"]):  # detections: the map's cells at the model's stride, clipped to tissue
        cells = [
            shapely.geometry.shape(f["geometry"])
            for f in detections
            if f["properties"]["name"].startswith(f"tissue {t} ")
        ]
        x0, y0, w, h = entry["box_l0"]
        on_tissue = outlines[f"tissue {t}"].intersection(shapely.geometry.box(x0, y0, x0 + w, y0 + h))
        assert 0 < len(cells) <= entry["shape"][1] * entry["shape"][2]
        assert shapely.union_all(cells).area == pytest.approx(on_tissue.area, rel=0.01)
        widths = [c.bounds[2] - c.bounds[0] for c in cells]
        assert max(widths) <= meta["cell_l0"] * 1.01 and meta["stride_px"] == 16


def test_without_heatmap_the_outputs_keep_their_form_and_the_rule_is_written(two_class_teacher, predicted, tmp_path):
    from hpcdistill.predict.prediction import predict_slides

    slide = two_class_teacher["slide"]["path"]
    mean = predict_slides(two_class_teacher["model"], [slide], tmp_path / "mean")
    for name in ("tissues.csv", "slides.csv"):  # the heat map changes no number
        assert (tmp_path / "mean" / name).read_text() == (predicted["out"] / name).read_text()
    best = predict_slides(two_class_teacher["model"], [slide], tmp_path / "max", slide_rule="max")
    assert not (tmp_path / "mean" / "heatmaps").exists()
    with open(tmp_path / "mean" / "slides.csv") as fh:
        rows = list(csv.reader(fh))
    head = [
        "slide",
        "path",
        "status",
        "call",
        "rule",
        "read",
        "level",
        "level_mag",
        "base_mag",
        "mpp",
        "mag_source",
        "reason",
        "p_duodenitis",
        "p_normal",
    ]
    assert rows[0] == head and rows[1][4] == "mean" and rows[1][5] == "level0"
    for name in ("tissues.csv",):
        assert (tmp_path / "mean" / name).read_text() == (tmp_path / "max" / name).read_text()
    tissues = best["slides"][0]["tissues"]
    assert best["slides"][0]["probs"] == pytest.approx(np.max([t["probs"] for t in tissues], axis=0).tolist())
    assert mean["slide_rule"] == "mean" and best["slide_rule"] == "max"
    features = json.loads(Path(mean["slides"][0]["geojson"]).read_text())["features"]
    assert {f["properties"]["objectType"] for f in features} == {"annotation"}


def test_heatmap_class_must_be_a_model_class(two_class_teacher, tmp_path):
    from hpcdistill.common.errors import HpcdistillError
    from hpcdistill.predict.prediction import predict_slides

    with pytest.raises(HpcdistillError, match="--heatmap-class 'celiac': not a class of the model"):
        predict_slides(
            two_class_teacher["model"],
            [two_class_teacher["slide"]["path"]],
            tmp_path,
            heatmap=True,
            heatmap_class="celiac",
        )
