"""Units a pathologist signs out: AUROC against scikit-learn (absent classes included), one aggregation rule for
slides and patients, and `evaluate --unit` on the real sharder's shards."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from hpcdistill.cli import main
from hpcdistill.evaluate.evaluation import evaluate_checkpoint
from hpcdistill.evaluate.options import EvalOptions
from hpcdistill.scoring.aggregation import unit_rows
from hpcdistill.scoring.auroc import auroc_ci


@pytest.mark.parametrize("absent", [None, 2])
def test_auroc_is_scikit_learns_per_class_and_macro(absent):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    if absent is not None:
        y[y == absent] = 0  # no positive of that class: it has no AUROC, and the macro runs over the others
    probs = rng.dirichlet([1, 1, 1], 300)
    probs[:, 0] = np.round(probs[:, 0], 1)  # ties, which count a half
    result = auroc_ci(y, probs, iterations=200)
    present = [c for c in range(3) if c != absent]
    expected = {c: roc_auc_score(y == c, probs[:, c]) for c in present}
    for c in range(3):
        if c == absent:
            assert result["per_class"][c] is None and result["undefined"] == [c]
        else:
            assert abs(result["per_class"][c][0] - expected[c]) < 1e-9
            assert result["per_class"][c][1] <= expected[c] <= result["per_class"][c][2]
    assert abs(result["macro"][0] - np.mean(list(expected.values()))) < 1e-9


def test_slides_and_patients_use_the_predict_rule():
    window = lambda slide, tissue, area, probs, y: {  # noqa: E731
        "key": f"{slide}{tissue}{area}",
        "slide": slide,
        "tissue": tissue,
        "area": area,
        "probs": probs,
        "y": y,
        "pred": int(np.argmax(probs)),
    }
    rows = [
        window("a", 0, 3.0, [0.9, 0.1], 0),
        window("a", 1, 1.0, [0.1, 0.9], 0),  # mean: 0.7 / 0.3
        window("b", 0, 1.0, [0.6, 0.4], 0),
        window("c", 0, 1.0, [0.2, 0.8], 1),
    ]
    mean = {r["unit"]: r["probs"] for r in unit_rows(rows, "slide", "mean", str)}
    assert mean["a"] == pytest.approx([0.7, 0.3]) and mean["b"] == pytest.approx([0.6, 0.4])
    top = {r["unit"]: r for r in unit_rows(rows, "slide", "max", str)}
    assert top["a"]["probs"] == pytest.approx([0.9, 0.9]) and top["a"]["pred"] == 0
    patients = {"a": "p1", "b": "p1", "c": "p2"}.get
    per_patient = {r["unit"]: r for r in unit_rows(rows, "patient", "mean", patients)}
    assert per_patient["p1"]["probs"] == pytest.approx([(2.7 + 0.1 + 0.6) / 5, (0.3 + 0.9 + 0.4) / 5])
    assert per_patient["p1"]["windows"] == 3 and per_patient["p2"]["y"] == 1


def test_evaluate_scores_slides_and_patients_with_cis_at_that_unit(tiny_dataset, tiny_teacher, tmp_path):
    record = evaluate_checkpoint(
        tiny_teacher,
        tiny_dataset["shards"],
        EvalOptions(split="test", iterations=300, units=("tissue", "slide", "patient"), out=str(tmp_path)),
    )
    manifest = tiny_dataset["manifest"]
    test_slides = {s: v for s, v in manifest["slides"].items() if v["split"] == "test" and v["status"] == "ok"}
    units = record["units"]
    assert units["tissue"]["n"] == record["samples"]
    assert units["slide"]["n"] == len(test_slides) and units["patient"]["n"] == len(
        {v["patient"] for v in test_slides.values()}
    )
    assert units["tissue"]["metrics"]["accuracy"][0] == pytest.approx(record["metrics"]["accuracy"][0])
    with open(tmp_path / "test_slide_predictions.csv") as fh:
        table = list(csv.DictReader(fh))
    classes = record["classes"]
    assert sorted(r["slide"] for r in table) == sorted(test_slides)
    y = np.array([classes.index(r["label"]) for r in table])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in table])
    for c, name in enumerate(classes):  # the slide-level AUROC is scikit-learn's on the same slide scores
        value = units["slide"]["auroc_per_class"][name]
        if len(set(y == c)) == 2:
            assert abs(value[0] - roc_auc_score(y == c, probs[:, c])) < 1e-9
        else:  # every test slide of one class, or none: no AUROC, shown as n/a
            assert value is None


def test_evaluate_cli_takes_units_and_the_old_level_flag_warns(tiny_dataset, tiny_teacher, tmp_path, capfd):
    code = main.main(
        [
            "evaluate",
            str(tiny_teacher),
            "--shards",
            str(tiny_dataset["shards"]),
            "--unit",
            "slide",
            "--iterations",
            "100",
            "--level",
            "0.9",
            "--out",
            str(tmp_path),
        ]
    )
    err = capfd.readouterr().err
    assert code == 0
    record = json.loads((tmp_path / "test.json").read_text())
    assert set(record["units"]) == {"slide"} and record["bootstrap"]["level"] == 0.9
    assert "--level is deprecated" in err
