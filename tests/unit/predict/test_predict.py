"""`predict` on real synthetic slides (Aperio SVS and pyramidal TIFF) with a real trained model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.predict.prediction import predict_slides
from hpcdistill.slides.tissue import class_colour
from hpcdistill.synthetic.dataset import write_slide
from hpcdistill.synthetic.specs import SlideSpec


def test_predict_svs_and_tiff(tiny_teacher, tmp_path):
    svs = tmp_path / "scan_a.svs"
    tif = tmp_path / "scan_b.tiff"
    write_slide(svs, SlideSpec(1536, 1152, fmt="svs", base_mag=40, class_id=0, seed=11, tissues=2))
    write_slide(tif, SlideSpec(768, 576, fmt="tiff", base_mag=20, class_id=2, seed=12, tissues=3))
    summary = predict_slides(tiny_teacher, [svs, tif], tmp_path / "out")
    slides = {s["path"]: s for s in summary["slides"]}
    assert all(s["status"] == "ok" for s in slides.values())
    for path in (svs, tif):
        result = slides[str(path)]
        assert result["call"] in summary["classes"]
        assert abs(sum(result["probs"]) - 1) < 1e-5 and len(result["tissues"]) >= 1
        # the slide call is the area-weighted mean of its windows' probabilities (here each tissue is one window)
        assert [w["box_l0"] for w in result["windows"]] == [t["box_l0"] for t in result["tissues"]]
        areas = [w["box_l0"][2] * w["box_l0"][3] for w in result["windows"]]
        mean0 = sum(a * w["probs"][0] for a, w in zip(areas, result["windows"])) / sum(areas)
        assert result["probs"][0] == pytest.approx(mean0, abs=1e-6)
        with Image.open(result["overlay"]) as img:  # each tissue framed in its call's colour
            pixels = np.asarray(img.convert("RGB"))
        for tissue in result["tissues"]:
            colour = np.array(class_colour(summary["classes"].index(tissue["pred"])), np.uint8)
            assert (pixels == colour).all(axis=-1).sum() > 20, tissue["pred"]
    with open(tmp_path / "out" / "tissues.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(len(s["tissues"]) for s in slides.values())
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["mag"] == 10.0


def test_predict_reports_unreadable_and_low_mag_slides(tiny_teacher, tmp_path):
    low = tmp_path / "low.tiff"
    write_slide(low, SlideSpec(256, 192, fmt="tiff", base_mag=5, mpp=2.0, class_id=1, seed=3, tissues=2))
    junk = tmp_path / "junk.svs"
    junk.write_text("not a slide")
    with pytest.raises(HpcdistillError, match="no slide could be classified"):
        predict_slides(tiny_teacher, [low, junk], tmp_path / "out")
    with open(tmp_path / "out" / "slides.csv") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert "below the model's 10x" in rows[str(low)]["reason"]
    assert rows[str(junk)]["status"] == "skipped" and "junk.svs" in rows[str(junk)]["reason"]


def test_a_tissue_too_big_for_the_gpu_skips_its_slide_only(tiny_teacher, tmp_path, monkeypatch):
    import torch

    from hpcdistill.models.export import load_exported
    from hpcdistill.predict import prediction

    big, small = tmp_path / "big.svs", tmp_path / "small.svs"
    write_slide(big, SlideSpec(1536, 1152, fmt="svs", base_mag=40, class_id=0, seed=11, tissues=1))
    write_slide(small, SlideSpec(1536, 1152, fmt="svs", base_mag=40, class_id=1, seed=12, tissues=1))
    calls = []

    class OutOfMemoryOnBig(torch.nn.Module):  # unit test of the error path: no GPU here
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if calls and calls[-1] == str(big):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return self.inner(x)

    def load_wrapped(path, **kwargs):
        exported = load_exported(path, **kwargs)
        exported.model = OutOfMemoryOnBig(exported.model)
        return exported

    real_slide = prediction.predict_slide

    def remember(exported, path, *args, **kwargs):
        calls.append(str(path))
        return real_slide(exported, path, *args, **kwargs)

    monkeypatch.setattr(prediction, "load_exported", load_wrapped)
    monkeypatch.setattr(prediction, "predict_slide", remember)
    summary = predict_slides(tiny_teacher, [big, small], tmp_path / "out")
    status = {s["path"]: s for s in summary["slides"]}
    assert status[str(small)]["status"] == "ok"
    reason = status[str(big)]["reason"]
    assert status[str(big)]["status"] == "skipped" and "\n" not in reason
    assert reason.startswith(f"{big} tissue 0 window 0 (") and "px at 10x): does not fit in GPU memory" in reason


def test_prediction_cuts_tissues_into_the_training_windows(tiny_teacher, tmp_path):
    """A tissue larger than the training shards' --max-size is classified window by window, as it was sharded."""
    import torch

    from hpcdistill.slides.windows import Windowing, split_windows

    blob = torch.load(tiny_teacher, map_location="cpu", weights_only=True)
    assert Windowing.from_dict(blob["windowing"]).max_size == 8192  # the tiny shards' default, from their manifest
    blob["windowing"] = {"mags": [10.0, 2.5, 1.25], "max_size": 96}
    model = tmp_path / "small_windows.pt"
    torch.save(blob, model)
    slide = tmp_path / "wide.svs"
    write_slide(slide, SlideSpec(1536, 1152, fmt="svs", base_mag=40, class_id=0, seed=21, tissues=1))
    summary = predict_slides(model, [slide], tmp_path / "out")
    result = summary["slides"][0]
    assert summary["windowing"] == blob["windowing"]
    windowing = Windowing.from_dict(blob["windowing"])
    expected = [w for t in result["tissues"] for w in split_windows(tuple(t["box_l0"]), (1536, 1152), 40.0, windowing)]
    assert [tuple(w["box_l0"]) for w in result["windows"]] == expected and len(expected) > len(result["tissues"])
    assert all(max(w["size"]) <= 96 for w in result["windows"])  # at 10x, the model's magnification
    for t in result["tissues"]:  # a tissue's probabilities: the area-weighted mean of its windows'
        mine = [w for w in result["windows"] if w["tissue"] == t["tissue"]]
        areas = [w["box_l0"][2] * w["box_l0"][3] for w in mine]
        mean0 = sum(a * w["probs"][0] for a, w in zip(areas, mine)) / sum(areas)
        assert t["probs"][0] == pytest.approx(mean0, abs=1e-6) and t["windows"] == len(mine)


def test_predict_as_two_local_tasks_equals_one_process(tiny_teacher, tiny_dataset, tmp_path, capsys):
    """`predict --cluster local --tasks 2` writes, row for row, what one process writes (slides in sorted order)."""
    from hpcdistill.cli import main

    slides = [str(p) for p in tiny_dataset["slides"][:5]]
    # the merge reads the labels and scores the cohort as one process does (these slides are the model's own)
    labels = ["--labels", str(tiny_dataset["labels"]), "--include-seen"]
    assert main.main(["predict", str(tiny_teacher), *slides, "--out", str(tmp_path / "one"), *labels]) == 0
    assert (
        main.main(
            [
                "predict",
                str(tiny_teacher),
                *slides,
                *labels,
                "--out",
                str(tmp_path / "two"),
                "--cluster",
                "local",
                "--tasks",
                "2",
            ]
        )
        == 0
    )
    for name in ("tissues.csv", "slides.csv", "scores.json"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
    one, two = (json.loads((tmp_path / d / "predictions.json").read_text()) for d in ("one", "two"))
    for a, b in zip(one["slides"], two["slides"], strict=True):  # each overlay and GeoJSON lies in its own --out
        for key in ("overlay", "geojson"):
            assert a.pop(key).replace("/one/", "/two/") == b.pop(key)
        assert a == b
    assert [s["path"] for s in one["slides"]] == sorted(slides)
    record = json.loads((tmp_path / "two" / "launch.json").read_text())
    assert [len(j["tasks"]) for j in record["jobs"]] == [2, 1]
    assert all((tmp_path / "two" / "overlays" / f"{Path(s).stem}.png").is_file() for s in slides)


def test_any_error_in_one_slide_is_its_skipped_row_and_the_others_are_written(tiny_teacher, tmp_path, monkeypatch):
    """The reported crash (GroupNorm's ValueError on a tissue a few pixels wide) stands for any fault of one slide."""
    from hpcdistill.predict import prediction

    bad, good = tmp_path / "bad.svs", tmp_path / "good.svs"
    write_slide(bad, SlideSpec(1536, 1152, fmt="svs", base_mag=40, class_id=0, seed=11, tissues=1))
    write_slide(good, SlideSpec(1536, 1152, fmt="svs", base_mag=40, class_id=1, seed=12, tissues=1))
    real_find = prediction.find_windows

    def fail_on_bad(slide, *args, **kwargs):
        if Path(slide.info.path).name == bad.name:
            raise ValueError("Expected more than 1 value per channel when training, got input size [1, 8, 1, 1]")
        return real_find(slide, *args, **kwargs)

    monkeypatch.setattr(prediction, "find_windows", fail_on_bad)
    summary = predict_slides(tiny_teacher, [bad, good], tmp_path / "out")
    rows = {r["slide"]: r for r in csv.DictReader((tmp_path / "out" / "slides.csv").open())}
    assert rows["good"]["status"] == "ok" and rows["bad"]["status"] == "skipped"
    assert (
        rows["bad"]["reason"]
        == f"{bad}: ValueError: Expected more than 1 value per channel when training, got input size [1, 8, 1, 1]"
    )
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["slides"] == summary["slides"]


def test_tissues_smaller_than_the_model_takes_are_skipped_with_a_count(tiny_dataset, tmp_path):
    """A network with one channel per GroupNorm group cannot take a 1-2 px input (the reported ValueError): the
    threshold comes from running the exported network, and only the tissues under it go."""
    from conftest import cfg_for

    from hpcdistill.models.export import load_exported
    from hpcdistill.predict.prediction import drop_small_tissues
    from hpcdistill.slides.windows import TissueWindows
    from hpcdistill.train import loop

    one_per_group = ("model.groups=8", "model.stem=halfres", "data.epoch_samples=2", "train.max_steps=1")
    best = loop.run(cfg_for(tiny_dataset, tmp_path, "narrow", "baseline", 2.5, *one_per_group))["best_path"]
    exported = load_exported(best)
    assert exported.min_side == 3  # found by running it: 1 and 2 px fail in GroupNorm

    class Info:
        base_mag = 40.0

    big, tiny = (0, 0, 640, 640), (700, 0, 32, 32)  # 40 px and 2 px at 2.5x
    found = TissueWindows(np.zeros((8, 8, 3), np.uint8), 1.0, [big, tiny], [[big], [tiny]], None, None)
    kept, note = drop_small_tissues(found, exported, Info())
    assert kept.boxes == [big] and kept.windows == [[big]]
    assert note == "1 tissue(s) under 3 px at 2.5x skipped: too small for the model"
    assert drop_small_tissues(kept, exported, Info()) == (kept, "")
