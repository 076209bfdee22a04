"""`predict --labels`: a lab scores a model on its own labelled slides, and gets the numbers `evaluate --unit
slide` gives on the same slides; one slide id in every output; a class missing from the scored set is said and
never averaged over silently."""

from __future__ import annotations

import csv
import json

import pytest

from hpcdistill.cli import main
from hpcdistill.evaluate.evaluation import evaluate_checkpoint
from hpcdistill.evaluate.options import EvalOptions
from hpcdistill.evaluate.report import load_results, write_report
from hpcdistill.shards.sharding import ShardParams, run_sharding

TINY_MAGS = (10.0, 2.5, 1.25)


@pytest.fixture(scope="module")
def lossless(tiny_dataset, tmp_path_factory):
    """The tiny dataset cut again with PNG crops: evaluation then sees exactly the pixels predict reads."""
    out = tmp_path_factory.mktemp("png") / "shards"
    params = ShardParams(mags=TINY_MAGS, image_format="png")
    manifest = run_sharding(
        [tiny_dataset["root"] / "slides"], out, labels_csv=str(tiny_dataset["labels"]), params=params, progress=False
    )
    test = sorted(s for s, v in manifest["slides"].items() if v["split"] == "test" and v["status"] == "ok")
    paths = [p for p in tiny_dataset["slides"] if p.stem in test]
    return {"shards": out, "manifest": manifest, "test": test, "paths": paths}


def test_predict_labels_equals_evaluate_by_slide(lossless, tiny_dataset, tiny_teacher, tmp_path):
    record = evaluate_checkpoint(
        tiny_teacher, lossless["shards"], EvalOptions(split="test", units=("slide",), out=str(tmp_path / "ev"))
    )
    assert (
        main.main(
            [
                "predict",
                str(tiny_teacher),
                *map(str, lossless["paths"]),
                "--out",
                str(tmp_path / "p"),
                "--labels",
                str(tiny_dataset["labels"]),
            ]
        )
        == 0
    )
    scores = json.loads((tmp_path / "p" / "scores.json").read_text())
    evaluated, predicted = record["units"]["slide"], scores["units"]["slide"]
    assert predicted["n"] == evaluated["n"] == len(lossless["test"])
    assert predicted["confusion"] == evaluated["confusion"]
    for metric in ("accuracy", "f1", "precision", "recall"):
        assert predicted["metrics"][metric] == pytest.approx(evaluated["metrics"][metric], abs=1e-12)
    if evaluated["metrics"]["auroc"] is not None:
        assert predicted["metrics"]["auroc"] == pytest.approx(evaluated["metrics"]["auroc"], abs=1e-6)
    # one slide id everywhere: the manifest's, in slides.csv, tissues.csv and the evaluation's predictions
    with open(tmp_path / "p" / "slides.csv") as fh:
        slides_csv = {r["slide"]: r["path"] for r in csv.DictReader(fh)}
    with open(tmp_path / "p" / "tissues.csv") as fh:
        tissues_csv = {r["slide"] for r in csv.DictReader(fh)}
    with open(tmp_path / "ev" / "test_predictions.csv") as fh:
        evaluated_csv = {r["slide"] for r in csv.DictReader(fh)}
    assert (
        set(slides_csv) == tissues_csv == evaluated_csv == set(lossless["test"]) <= set(lossless["manifest"]["slides"])
    )
    assert sorted(slides_csv.values()) == sorted(map(str, lossless["paths"]))  # the path is its own column


def test_a_class_missing_from_the_scored_set_is_said_and_not_averaged(
    lossless, tiny_dataset, tiny_teacher, tmp_path, capfd
):
    classes = tiny_dataset["manifest"]["classes"]
    label = {s: v["label"] for s, v in lossless["manifest"]["slides"].items()}
    kept = [p for p in lossless["paths"] if label[p.stem] != label[lossless["test"][0]]]
    missing = {label[s] for s in lossless["test"]} - {label[p.stem] for p in kept}
    assert kept and missing  # the scored slides lack at least one class
    summary_scores = main.main(
        [
            "predict",
            str(tiny_teacher),
            *map(str, kept),
            "--out",
            str(tmp_path / "p"),
            "--labels",
            str(tiny_dataset["labels"]),
        ]
    )
    assert summary_scores == 0
    err = capfd.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "in the scored set" in ln]
    assert all(name in line for name in missing) and "n/a" in line
    slide = json.loads((tmp_path / "p" / "scores.json").read_text())["units"]["slide"]
    assert set(slide["absent_classes"]) >= missing
    for name in missing:  # shown as n/a, not as 0 and not averaged in
        assert slide["per_class"]["recall"][classes.index(name)] is None
        assert slide["auroc_per_class"][name] is None
    # the report names the missing class too, on the terminal and in report.md
    record = evaluate_checkpoint(
        tiny_teacher,
        lossless["shards"],
        EvalOptions(split="test", units=("slide",), iterations=100, out=str(tmp_path / "run" / "eval")),
    )
    assert record["units"]["slide"]["n"] == len(lossless["test"])
    report = write_report(load_results([tmp_path / "run"]), tmp_path / "report").read_text()
    assert "## Slide level (Table 4 layout, AUROC included)" in report and "AUROC" in report
    assert "## Per class and confusion matrices (slide level)" in report
