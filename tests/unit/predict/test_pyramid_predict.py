"""`shard --source pyramid` -> an export that records it -> `predict` reads the pyramid by default; `--read`
chooses, a read other than the training source is said in one line, and slides.csv records what was read."""

from __future__ import annotations

import csv

import pytest
import torch

from hpcdistill.config.loading import load_config
from hpcdistill.predict.prediction import predict_slides
from hpcdistill.shards.manifest import shard_source
from hpcdistill.shards.sharding import ShardParams, run_sharding
from hpcdistill.synthetic.dataset import write_slide
from hpcdistill.synthetic.specs import SlideSpec
from hpcdistill.train import loop

TINY_MAGS = (10.0, 2.5, 1.25)


@pytest.fixture(scope="module")
def pyramid_student(tiny_dataset, tmp_path_factory):
    """A 2.5x baseline trained on shards cut with --source pyramid from the tiny dataset's slides."""
    root = tmp_path_factory.mktemp("pyramid_source")
    params = ShardParams(mags=TINY_MAGS, source="pyramid")
    manifest = run_sharding(
        [tiny_dataset["root"] / "slides"],
        root / "shards",
        labels_csv=str(tiny_dataset["labels"]),
        params=params,
        progress=False,
    )
    from conftest import tiny_train_overrides

    summary = loop.run(load_config(None, tiny_train_overrides(root / "shards", root, "pyr", "baseline", 2.5)))
    return {"root": root, "manifest": manifest, "best": summary["best_path"]}


def test_the_source_travels_from_shards_to_export(pyramid_student, tiny_dataset):
    manifest = pyramid_student["manifest"]
    assert shard_source(manifest) == "pyramid" and shard_source(tiny_dataset["manifest"]) == "level0"
    assert manifest["source"] == manifest["params"]["source"] == "pyramid"
    # level 0 is every older folder's source: its fingerprint (what a rerun must match) does not name it
    assert tiny_dataset["manifest"]["source"] == "level0" and "source" not in tiny_dataset["manifest"]["params"]
    blob = torch.load(pyramid_student["best"], map_location="cpu", weights_only=True)
    assert blob["source"] == "pyramid"
    # these slides have no pyramid level near 10x or below: their crops come from level 0 either way, byte for byte
    for tar in sorted((tiny_dataset["shards"]).glob("*.tar")):
        assert (pyramid_student["root"] / "shards" / tar.name).read_bytes() == tar.read_bytes(), tar.name


@pytest.fixture(scope="module")
def scanner_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("scanner") / "scan.svs"
    write_slide(path, SlideSpec(8192, 6144, fmt="svs", base_mag=40, seed=5, tissues=2, pyramid="scanner"))
    return path


def slides_csv(folder) -> list[dict]:
    with open(folder / "slides.csv") as fh:
        return list(csv.DictReader(fh))


def test_predict_reads_what_the_export_was_trained_on(pyramid_student, tiny_teacher, scanner_slide, tmp_path, capfd):
    summary = predict_slides(pyramid_student["best"], [scanner_slide], tmp_path / "student")
    (row,) = slides_csv(tmp_path / "student")
    assert summary["read"] == summary["trained_on"] == "pyramid"
    assert (row["read"], row["level"], row["level_mag"], row["reason"]) == ("pyramid", "2", "2.5", "")
    teacher = predict_slides(tiny_teacher, [scanner_slide], tmp_path / "teacher")  # trained on level 0
    (row,) = slides_csv(tmp_path / "teacher")
    assert teacher["read"] == "level0" and (row["read"], row["level"]) == ("level0", "0")
    assert "trained on crops" not in capfd.readouterr().err


def test_another_read_is_said_and_recorded(tiny_teacher, scanner_slide, tmp_path, capfd):
    summary = predict_slides(tiny_teacher, [scanner_slide], tmp_path / "p", read="pyramid")
    (line,) = [ln for ln in capfd.readouterr().err.splitlines() if "trained on crops" in ln]
    assert "from level0 but reading pyramid" in line
    (row,) = slides_csv(tmp_path / "p")
    assert summary["read"] == "pyramid" and (row["read"], row["level"], row["level_mag"]) == ("pyramid", "1", "10.0")
    assert summary["slides"][0]["call"] in summary["classes"]


def test_a_pyramid_without_a_near_level_falls_back_and_says_so(tiny_teacher, tiny_dataset, tmp_path):
    slide = tiny_dataset["slides"][0]  # 1536x1152 at 40x: level 0 only
    predict_slides(tiny_teacher, [slide], tmp_path / "p", read="pyramid")
    (row,) = slides_csv(tmp_path / "p")
    assert row["read"] == "pyramid" and row["level"] == "0"
    assert row["reason"].startswith("no pyramid level near 10x: read level 0 at ")
