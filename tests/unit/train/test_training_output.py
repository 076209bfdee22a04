"""What training says while it runs: the loss reaches TensorBoard at least once per epoch whatever log.log_every is,
and each validation is one line (epoch, step, train loss, the selection metric, whether it is a new best)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import cfg_for
from train_helpers import scalars

from hpcdistill.train import loop


def test_a_run_shorter_than_log_every_still_logs_its_loss_each_epoch(tiny_dataset, tmp_path, capsys):
    short = ("log.log_every=1000", "train.epochs=2", "data.epoch_samples=4", "train.grad_accum=1")
    loop.run(cfg_for(tiny_dataset, tmp_path, "quiet", "baseline", 2.5, *short))
    logged = scalars(tmp_path / "quiet" / "tb", "loss/total")
    assert sorted(logged) == [4, 8]  # each epoch's last step, though 1000 steps were asked between logs
    lines = [line for line in capsys.readouterr().err.splitlines() if re.search(r"epoch \d+/2 step", line)]
    assert len(lines) == 2, lines
    assert re.fullmatch(  # the selection metric by its name, then the accuracies a reader expects
        r"hpcdistill: epoch 1/2 step 4: train loss \d+\.\d{4}, val OvR accuracy \(paper\) \d\.\d{4} \(the "
        r"selection metric; new best\), balanced accuracy \d\.\d{4}, top-1 accuracy \d\.\d{4}",
        lines[0],
    )


def test_metrics_jsonl_holds_tensorboards_numbers_and_output_without_a_terminal_has_no_bars(
    tiny_dataset, tmp_path, capfd
):
    """metrics.jsonl: a line per log step and per validation, the same numbers as TensorBoard; where stderr is not a
    terminal (here: captured, as in a SLURM .out file) no bar is drawn, and progress is a plain line."""
    short = ("train.epochs=2", "data.epoch_samples=4", "train.grad_accum=1", "log.log_every=2")
    short += ("train.schedule=cosine", "train.warmup_fraction=0.25")  # DeepSpeed's warm-up scheduler
    loop.run(
        cfg_for(
            tiny_dataset, tmp_path, "logged", "baseline", 2.5, *short, "log.progress=true", "log.progress_every_s=0"
        )
    )
    lines = [json.loads(line) for line in (tmp_path / "logged" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in lines if r["kind"] == "train"}
    val = {r["step"]: r for r in lines if r["kind"] == "validation"}
    assert sorted(train) == [2, 4, 6, 8] and sorted(val) == [4, 8]
    assert [val[4]["epoch"], val[8]["epoch"]] == [1, 2]
    for row in train.values():  # what an HPC engineer reads first when a run is slow or unstable
        assert row["train/grad_norm"] > 0 and row["time/compute_s"] > 0 and row["memory/cpu_peak_rss_gib"] > 0.1
        assert 0 <= row["time/data_wait_share"] <= 1
    for tag, rows in (("loss/total", train), ("lr", train), ("val/accuracy", val), ("val/balanced_accuracy", val)):
        logged = scalars(tmp_path / "logged" / "tb", tag)
        assert logged and {s: rows[s][tag] for s in logged} == pytest.approx(logged, rel=1e-6), tag
    out, err = capfd.readouterr()
    assert "\r" not in err and "it/s" not in err  # no redrawn bar in a file
    assert "before it has started" not in out + err  # DeepSpeed's warm-up scheduler start, said in every run
    assert re.search(r"hpcdistill: logged: epoch 1/2, step 2/8, ETA \S+", err), err[-2000:]


def test_a_resume_drops_the_metrics_lines_past_its_step(tmp_path):
    """Lines logged after the checkpoint a run resumes from are logged again by the resumed run: dropped first, with
    a line torn by the kill."""
    from hpcdistill.train.metrics_log import METRICS_FILE, MetricsLog

    class Recorder:
        def __init__(self):
            self.calls = []

        def add_scalar(self, *args):
            self.calls.append(args)

        def flush(self):
            pass

        def close(self):
            pass

    path = tmp_path / METRICS_FILE
    path.write_text('{"kind": "train", "step": 5, "loss/total": 1.0}\n{"kind": "train", "step": 10}\n{"kind": "tr')
    writer = Recorder()
    log = MetricsLog(writer, tmp_path, resume_step=5, epoch_of=lambda: 1)
    log.add_scalar("loss/total", 0.5, 6)
    log.add_scalar("val/accuracy", float("nan"), 6)
    log.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 5), ("train", 6), ("validation", 6)]
    assert rows[2]["val/accuracy"] == "nan"  # said, not dropped: JSON has no NaN
    assert [call[0] for call in writer.calls] == ["loss/total", "val/accuracy"]  # TensorBoard got both too


def test_the_confusion_image_names_the_classes_and_writes_the_counts():
    from hpcdistill.train.class_logging import CELL, confusion_image

    few, many = (
        confusion_image([[1, 0], [0, 1]], ["normal", "tumor"]),
        confusion_image([[5, 0], [0, 5]], ["normal", "tumor"]),
    )
    assert few.shape == many.shape and few.shape[1] > 2 * CELL + 6 * len("normal")  # a margin for the row names
    assert (few != many).any()  # same shares, different counts: the counts are drawn
    longer = confusion_image([[1, 0], [0, 1]], ["normal", "adenocarcinoma"])
    assert longer.shape[1] > few.shape[1]  # the names are drawn, so the margin follows them


def test_train_dry_run_writes_nothing_and_overwrite_starts_over(tiny_dataset, tmp_path, capsys):
    """`train --dry-run` prints the resolved config, the budget and what it would do with the run folder, writing
    nothing; `--overwrite` removes the earlier run's results (a stale eval/ too) and trains afresh; `--no-progress`
    is log.progress=false; a teacher inside the run folder is never removed."""
    from hpcdistill.cli import main

    path = cfg_for(tiny_dataset, tmp_path, "again", "baseline", 2.5, "data.epoch_samples=4").save(tmp_path / "c.yaml")
    assert main.main(["train", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "resume: auto" in out and "budget: 1 epochs x 2 optimizer steps" in out
    assert f"run folder: {tmp_path / 'again'} (start)" in out and not (tmp_path / "again").exists()
    assert main.main(["train", str(path), "--no-progress"]) == 0
    (tmp_path / "again" / "eval").mkdir()
    (tmp_path / "again" / "eval" / "test.json").write_text("{}")  # an evaluation of the weights about to go
    assert main.main(["train", str(path), "--dry-run"]) == 0
    assert "(resume from " in capsys.readouterr().out
    assert main.main(["train", str(path), "--overwrite", "--dry-run"]) == 0
    assert (
        "(start over, removing the earlier run's best.pt, checkpoints, config.yaml, eval, " in capsys.readouterr().out
    )
    first = (tmp_path / "again" / "metrics.jsonl").read_text()
    assert main.main(["train", str(path), "--overwrite"]) == 0
    assert "removed the earlier run's best.pt" in capsys.readouterr().err
    assert not (tmp_path / "again" / "eval").exists()
    assert (tmp_path / "again" / "metrics.jsonl").read_text().count('"kind": "validation"') == first.count(
        '"kind": "validation"'
    )  # one run's lines, not two
    teacher = tmp_path / "again" / "best.pt"
    assert main.main(["train", str(path), "--overwrite", "train.mode=distill", f"teacher.checkpoint={teacher}"]) == 2
    assert "an input of this run" in capsys.readouterr().err and teacher.is_file()
