"""One writer per folder and the end a signal brings, through the real CLI in real processes: a second `train` into a
running run's folder is refused naming the holder, a killed holder blocks nothing; SIGTERM and SIGINT end `train`
and `shard` in one line with 143/130 and the rerun completes; a second `shard` or `predict` into a held folder, and an
output path under a file, are one line each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cfg_for
from train_helpers import clean_env, error_line

from hpcdistill.cli import main
from hpcdistill.common.folder_lock import one_writer
from hpcdistill.common.progress import read_progress

pytestmark = pytest.mark.slow
LONG = ("train.epochs=500", "data.epoch_samples=12", "train.checkpoint_every_steps=2")


def start_training(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hpcdistill", "train", str(config)],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path) -> None:
    """Until the run has trained past its first checkpoint (it holds its folder all along)."""
    deadline = time.monotonic() + 240
    while not list((run_dir / "checkpoints").glob("step*/COMPLETE")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:] if proc.stderr else ""
        time.sleep(0.2)


def test_a_second_train_into_a_running_folder_is_refused_and_a_killed_one_blocks_nothing(
    tiny_dataset, tmp_path, capsys
):
    config = cfg_for(tiny_dataset, tmp_path, "busy", "baseline", 2.5, *LONG).save(tmp_path / "busy.yaml")
    first = start_training(config)
    try:
        wait_for_checkpoint(first, tmp_path / "busy")
        assert main.main(["train", str(config), "run.seed=1"]) == 2
        line = error_line(capsys)
        assert f"{tmp_path / 'busy'}: another hpcdistill is writing here: host " in line
        assert f"pid {first.pid}, since " in line and "hpcdistill train" in line
    finally:
        first.kill()  # SIGKILL: no clean-up at all
        first.wait()
    assert main.main(["train", str(config), "train.max_steps=4"]) == 0  # the dead writer's lock went with it


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_train_in_one_line_and_the_rerun_resumes(tiny_dataset, tmp_path, signum):
    config = cfg_for(tiny_dataset, tmp_path, "sig", "baseline", 2.5, *LONG).save(tmp_path / "sig.yaml")
    proc = start_training(config)
    wait_for_checkpoint(proc, tmp_path / "sig")
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"hpcdistill: interrupted by {name}: stopped; rerun the same command to resume"
    )
    assert "Traceback" not in stderr and read_progress(tmp_path / "sig")["phase"] == "interrupted"
    assert main.main(["train", str(config), "train.max_steps=6"]) == 0


def test_sigterm_ends_a_sharding_run_with_workers_and_the_rerun_completes(shard_slides, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "hpcdistill",
        "shard",
        str(shard_slides["good"]),
        "--labels",
        str(shard_slides["labels"]),
        "--out",
        str(out),
        "--workers",
        "2",
        "--no-progress",
    ]
    proc = subprocess.Popen(command, env=clean_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "qc").is_dir() or not list((out / "qc").iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)  # the workers are stopped, not waited for
    assert proc.returncode == 143 and stderr.strip().splitlines()[-1].startswith("hpcdistill: interrupted by SIGTERM")
    assert "Traceback" not in stderr
    assert subprocess.run(command, env=clean_env(), capture_output=True).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    counts = {split: entry["samples"] for split, entry in manifest["splits"].items()}
    assert counts == {split: entry["samples"] for split, entry in shard_slides["manifest"]["splits"].items()}
    assert not list(out.glob(".*.tmp")) and not (out / ".spool").exists()


def test_shard_and_predict_into_a_held_folder_are_refused_naming_the_holder(
    shard_slides, tiny_teacher, tmp_path, capsys
):
    slide = str(shard_slides["good"] / "s40a.tiff")
    for command in (["shard", slide, "--no-progress"], ["predict", str(tiny_teacher), slide]):
        out = tmp_path / command[0]
        with one_writer(out):
            assert main.main([*command, "--out", str(out)]) == 2
        line = error_line(capsys)
        assert f"{out}: another hpcdistill is writing here: host " in line and f"pid {os.getpid()}, since " in line
        assert main.main([*command, "--out", str(out)]) == 0  # free again


def test_an_output_path_under_a_file_is_one_line(shard_slides, tiny_teacher, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file where a folder should go\n")
    slide = str(shard_slides["good"] / "s40a.tiff")
    for argv in (["synth", "--out", str(taken / "slides")], ["predict", str(tiny_teacher), slide, "--out", str(taken)]):
        assert main.main(argv) == 2
        line = error_line(capsys)
        assert str(taken) in line and ("Not a directory" in line or "File exists" in line), line
