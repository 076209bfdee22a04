"""What a pathologist must not misread, said in one line through the real CLI: a model that learned nothing (every
call one class), a cohort too small to read as a result; and a collapsed teacher refused before it teaches."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from hpcdistill.cli import main
from hpcdistill.common.errors import TrainError
from hpcdistill.config.loading import load_config
from hpcdistill.models.export import load_exported
from hpcdistill.scoring.cohort_checks import collapse_line, small_count_line
from hpcdistill.train.teacher_gate import check_teacher


def collapsed_export(trained: Path, out: Path, val: dict | None = None) -> Path:
    """The trained export with its classifier forced to class 0 whatever the input: a model that learned nothing."""
    blob = torch.load(trained, weights_only=True)
    weight = next(k for k in blob["state_dict"] if k.endswith("fc.weight"))
    blob["state_dict"][weight].zero_()
    bias = blob["state_dict"][weight.replace("weight", "bias")]
    bias.zero_()
    bias[0] = 10.0
    if val is not None:
        blob["val"] = val
    torch.save(blob, out)
    return out


def test_collapsed_model_and_small_cohort_are_said_by_evaluate(tiny_dataset, tiny_teacher, tmp_path, capsys):
    model = collapsed_export(tiny_teacher, tmp_path / "collapsed.pt")
    shards = str(tiny_dataset["shards"])
    argv = ["evaluate", str(model), "--shards", shards, "--unit", "tissue", "--unit", "patient"]
    assert main.main([*argv, "--iterations", "100", "--out", str(tmp_path / "ev")]) == 0
    err = capsys.readouterr().err
    collapse = [line for line in err.splitlines() if "collapsed onto one class" in line]
    assert collapse and "tissue level: the model called" in collapse[0] and "balanced accuracy 0.33" in collapse[0]
    patients = len({s["patient"] for s in tiny_dataset["manifest"]["slides"].values() if s.get("split") == "test"})
    assert f"patient level: a small cohort: only {patients} patients (under 20)" in err
    report = tmp_path / "report"
    assert main.main(["report", str(tmp_path / "ev" / "test.json"), "--out", str(report)]) == 0
    text = (report / "report.md").read_text()
    assert "## Collapsed models and small cohorts" in text and "collapsed onto one class" in text
    assert "Cohen's kappa (×100; 0 = chance) is unweighted (no class order declared" in text
    again = ["report", str(tmp_path / "ev" / "test.json"), "--out", str(report)]
    assert main.main(again) == 2  # a finished report is replaced only when asked, as every command's --out
    assert f"{report}: holds a finished result (report.md); pass --overwrite" in capsys.readouterr().err
    assert main.main([*again, "--overwrite"]) == 0


def test_a_collapsed_teacher_is_refused_whatever_its_accuracy(tiny_teacher, tmp_path, capsys):
    val = {"accuracy": 0.7, "max_call_share": 0.97}  # OvR accuracy looks passable; its calls are one class
    teacher = load_exported(collapsed_export(tiny_teacher, tmp_path / "t.pt", val))
    cfg = load_config(None, ["train.mode=distill", f"teacher.checkpoint={tmp_path / 't.pt'}"])
    with pytest.raises(TrainError, match=r"called 97% of its validation tissues one class: it has collapsed"):
        check_teacher(cfg, teacher)
    off = load_config(
        None, ["train.mode=distill", f"teacher.checkpoint={tmp_path / 't.pt'}", "teacher.min_val_accuracy=0"]
    )
    check_teacher(off, teacher)  # the gate off: said, not refused
    assert "it has collapsed onto one class (not refused: the gate is off)" in capsys.readouterr().err


def test_the_lines_need_what_they_claim():
    classes = ["normal", "duodenitis", "celiac"]
    assert collapse_line([1] * 9 + [0], classes, "slide", [0, 1, 2] * 3 + [0]).startswith("the model called 9 of 10")
    assert collapse_line([1] * 9 + [0], classes, "slide", [1] * 10) is None  # the cohort itself is one class
    assert collapse_line([0, 1, 2, 1, 1, 1], classes, "slide", [0, 1, 2, 0, 1, 2]) is None  # 4 of 6: not a collapse
    assert "trained on 3 classes" in collapse_line([2] * 24, classes, "slide")  # predict without labels
    assert small_count_line(list(range(3)) * 10, classes, "slide") is None
    assert "under 5 slides of celiac 2" in small_count_line([0] * 15 + [1] * 15 + [2] * 2, classes, "slide")


def test_predict_without_labels_names_a_model_that_calls_one_class(tiny_dataset, tiny_teacher, tmp_path, capsys):
    model = collapsed_export(tiny_teacher, tmp_path / "collapsed.pt")
    slides = [str(s) for s in tiny_dataset["slides"][:5]]
    assert main.main(["predict", str(model), *slides, "--out", str(tmp_path / "pred"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    first = load_exported(model).classes[0]  # the class the forced bias calls
    assert f"the model called 5 of 5 slides {first!r} though it was trained on 3 classes: it may have learned" in err


def test_a_cohort_of_the_models_own_slides_is_said_and_left_out(tiny_dataset, tiny_teacher, tmp_path, capsys):
    """The export knows the slides it trained and validated on: `evaluate` says how many scored slides are its
    own, and `predict --labels` leaves them out of the scores (and marks them in slides.csv) unless asked."""
    shards, manifest = str(tiny_dataset["shards"]), tiny_dataset["manifest"]
    argv = ["evaluate", str(tiny_teacher), "--shards", shards, "--split", "train", "--iterations", "50"]
    assert main.main([*argv, "--out", str(tmp_path / "ev")]) == 0
    train = [s for s, v in manifest["slides"].items() if v["split"] == "train" and v["status"] == "ok"]
    assert f"{len(train)} of {len(train)} scored slides and " in capsys.readouterr().err
    split_of = {Path(p).stem: manifest["slides"].get(Path(p).stem, {}).get("split") for p in tiny_dataset["slides"]}
    own = [p for p in tiny_dataset["slides"] if split_of[Path(p).stem] == "train"][:2]
    unseen = [p for p in tiny_dataset["slides"] if split_of[Path(p).stem] == "test"]
    out = tmp_path / "pred"
    argv = ["predict", str(tiny_teacher), *map(str, own + unseen), "--out", str(out), "--no-progress"]
    assert main.main([*argv, "--labels", str(tiny_dataset["labels"])]) == 0
    err = capsys.readouterr().err
    assert f"2 of {len(own) + len(unseen)} labelled slides are the model's own" in err and "left out" in err
    scores = json.loads((out / "scores.json").read_text())
    assert scores["units"]["slide"]["n"] == len(unseen) and sorted(scores["seen_slides"]) == sorted(
        Path(p).stem for p in own
    )
    with open(out / "slides.csv", newline="") as fh:
        rows = {r["slide"]: r for r in csv.DictReader(fh)}
    assert {rows[Path(p).stem]["seen"] for p in own} == {"yes"} and {rows[Path(p).stem]["seen"] for p in unseen} == {
        "no"
    }
    assert all(r["label"] and r["correct"] in ("yes", "no") for r in rows.values())


def test_an_array_predictions_merge_names_a_collapsed_model(tiny_dataset, tiny_teacher, tmp_path, capsys):
    """`predict --cluster local` without labels: the merge, not a task, sees every call and says the collapse."""
    model = collapsed_export(tiny_teacher, tmp_path / "collapsed.pt")
    slides = [str(s) for s in tiny_dataset["slides"][:5]]
    argv = ["predict", str(model), *slides, "--out", str(tmp_path / "pred"), "--no-progress"]
    assert main.main([*argv, "--cluster", "local", "--tasks", "2"]) == 0
    first = load_exported(model).classes[0]
    assert f"the model called 5 of 5 slides {first!r} though it was trained on 3 classes" in capsys.readouterr().err


def test_ordinal_classes_give_quadratic_kappa_and_a_wrong_order_is_refused(tiny_dataset, tmp_path, capsys):
    """data.ordinal_classes (the manifest's order or its reverse) makes evaluate's kappa quadratic-weighted, equal to
    scikit-learn's on the written predictions; an order that is not the manifest's is refused before training."""
    from conftest import cfg_for
    from sklearn.metrics import cohen_kappa_score

    classes = tiny_dataset["manifest"]["classes"]
    path = cfg_for(tiny_dataset, tmp_path, "ordinal", "teacher", 10.0).save(tmp_path / "t.yaml")
    shuffled = f"data.ordinal_classes=[{classes[1]},{classes[0]},{classes[2]}]"
    assert main.main(["train", str(path), shuffled]) == 2
    expected_line = f"data.ordinal_classes: {[classes[1], classes[0], classes[2]]}, but the manifest's"
    assert expected_line in capsys.readouterr().err
    reverse = f"data.ordinal_classes=[{','.join(reversed(classes))}]"
    assert main.main(["train", str(path), reverse]) == 0
    model = tmp_path / "ordinal" / "best.pt"
    argv = ["evaluate", str(model), "--shards", str(tiny_dataset["shards"]), "--iterations", "50"]
    assert main.main([*argv, "--out", str(tmp_path / "ev")]) == 0
    record = json.loads((tmp_path / "ev" / "test.json").read_text())
    with open(tmp_path / "ev" / "test_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    expected = cohen_kappa_score([r["label"] for r in rows], [r["pred"] for r in rows], weights="quadratic")
    assert record["kappa_weights"] == "quadratic" and record["metrics"]["kappa"][0] == pytest.approx(expected)
