"""Every output records how it was made (common.provenance): the run folder, its exports, an evaluation, a
prediction, a shard manifest and the report, through the real CLI; the report says when its runs disagree."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hpcdistill.cli import main
from hpcdistill.common.provenance import provenance


def check_record(record: dict, command: str) -> None:
    """A provenance record of this checkout, made by `command`."""
    assert record["hpcdistill"] and torch.__version__.startswith(record["libraries"]["torch"].split("+")[0])
    assert record["git"] and len(record["git"]["commit"]) == 40 and isinstance(record["git"]["dirty"], bool)
    assert command in record["command"] and record["host"] and record["time"] and record["python"]


def test_every_output_records_how_it_was_made(tiny_dataset, tmp_path, capsys):
    shards = tiny_dataset["shards"]
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    assert manifest["name"] == Path(shards).resolve().parent.name  # the folder is called shards: its parent's
    assert manifest["provenance"]["libraries"]["torch"] and manifest["provenance"]["git"]
    from conftest import cfg_for

    path = cfg_for(tiny_dataset, tmp_path, "made", "teacher", 10.0).save(tmp_path / "c.yaml")
    assert main.main(["train", str(path)]) == 0
    run = tmp_path / "made"
    check_record(json.loads((run / "provenance.json").read_text()), "train")
    export = torch.load(run / "best.pt", weights_only=True)
    check_record(export["provenance"], "train")
    argv = ["evaluate", str(run / "best.pt"), "--shards", str(shards), "--iterations", "50", "--no-progress"]
    assert main.main(argv) == 0
    record = json.loads((run / "eval" / "test.json").read_text())
    check_record(record["provenance"], "evaluate")
    assert record["model_provenance"] == export["provenance"] and record["dataset"] == manifest["name"]
    slides = [str(s) for s in tiny_dataset["slides"][:2]]
    assert main.main(["predict", str(run / "best.pt"), *slides, "--out", str(tmp_path / "pred"), "--no-progress"]) == 0
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    check_record(predictions["provenance"], "predict")
    assert predictions["model_provenance"] == export["provenance"]
    assert main.main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## How these results were made" in text and "(model)" in text and "This report: hpcdistill" in text
    assert "Warning" not in text
    # an evaluation made with another torch: said in one line on the terminal and in the report
    record["provenance"]["libraries"]["torch"] = "1.0.0"
    (run / "eval" / "test.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main.main(["report", str(run), "--out", str(tmp_path / "report"), "--overwrite"]) == 0
    assert "were made with 2 different versions" in capsys.readouterr().err
    assert (
        "**Warning:** the reported runs were made with 2 different versions"
        in (tmp_path / "report" / "report.md").read_text()
    )


def test_the_record_names_the_slurm_job(monkeypatch):
    from hpcdistill.common.provenance import SLURM_IDS

    for variable in SLURM_IDS:  # whatever the environment the tests run in
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert provenance()["slurm"] == {"job": "4242", "array_task": "3"}
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert provenance()["slurm"] is None
