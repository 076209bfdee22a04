"""SIGINT and SIGTERM end `evaluate`, `predict` and `launch --cluster local` in one line with exit 130/143, leave no
half-written output, and a rerun completes; the local launch cancels its jobs, so `status` shows none running.
(`train` and `shard` have theirs in test_writers_and_signals.py.)"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_helpers import CPU, TINY, tiny_experiment
from train_helpers import clean_env

from hpcdistill.cli import main
from hpcdistill.cluster.status import experiment_status
from hpcdistill.common.folder_lock import HOLDER

pytestmark = pytest.mark.slow


def start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hpcdistill", *argv], env=clean_env(), stderr=subprocess.PIPE, text=True
    )


def wait_for(proc: subprocess.Popen, done, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def ended_in_one_line(proc: subprocess.Popen, signum: int, within: float = 60) -> str:
    sent = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < within, f"took {time.monotonic() - sent:.0f} s to stop"
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"hpcdistill: interrupted by {signal.Signals(signum).name}: "), last
    return last


def test_sigterm_ends_evaluate_mid_bootstrap_and_writes_nothing(tiny_dataset, tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    argv = ["evaluate", str(tiny_teacher), "--shards", str(tiny_dataset["shards"]), "--out", str(out)]
    monkeypatch.setenv("HPCDISTILL_MAX_BOOTSTRAP_ITERATIONS", "50000000")  # past the limit, as documented
    proc = start(*argv, "--iterations", "50000000")  # the bootstrap alone runs for minutes
    wait_for(proc, lambda: (out / HOLDER).is_file(), "the output folder's lock")
    time.sleep(2)  # into the scoring
    ended_in_one_line(proc, signal.SIGTERM)
    assert not list(out.glob("*.json")) and not list(out.glob("*.csv")) and not list(out.glob(".*.tmp"))
    assert main.main([*argv, "--iterations", "20"]) == 0
    assert json.loads((out / "test.json").read_text())["bootstrap"]["iterations"] == 20


def test_sigint_ends_predict_between_slides_and_the_rerun_writes_every_slide(tiny_dataset, tiny_teacher, tmp_path):
    out = tmp_path / "pred"
    slides = [str(p) for p in tiny_dataset["slides"]]
    proc = start("predict", str(tiny_teacher), *slides, "--out", str(out), "--heatmap")
    wait_for(proc, lambda: (out / HOLDER).is_file(), "the output folder's lock")
    ended_in_one_line(proc, signal.SIGINT)
    assert not (out / "predictions.json").exists() and not list(out.rglob(".*.tmp"))
    assert main.main(["predict", str(tiny_teacher), *slides, "--out", str(out)]) == 0
    assert len(json.loads((out / "predictions.json").read_text())["slides"]) == len(slides)


def test_sigint_ends_a_local_launch_and_status_shows_no_job_running(launch_shards, tmp_path):
    teacher = {"config": "configs/demo/teacher.yaml", "overrides": [*TINY, "train.epochs=500"]}
    path = tiny_experiment(tmp_path, launch_shards, "sig", {}, teacher=teacher, resources={"default": CPU})
    exp_dir = tmp_path / "runs" / "sig"
    proc = start("launch", str(path), "--cluster", "local")
    wait_for(proc, lambda: any(r["state"] == "RUNNING" for r in _rows(exp_dir)), "a running job")
    assert "rerun" in ended_in_one_line(proc, signal.SIGINT)
    rows = experiment_status(exp_dir)
    assert rows and not [r for r in rows if r["state"] in ("RUNNING", "PENDING")], rows


def _rows(exp_dir: Path) -> list[dict]:
    return experiment_status(exp_dir) if (exp_dir / "launch.json").is_file() else []


def test_the_shipped_demo_experiment_launched_from_an_empty_folder_runs_there(tiny_dataset, tmp_path):
    """As configs/experiments/demo.yaml's header says: shards in ./shards/demo, then `hpcdistill launch
    configs/experiments/demo.yaml --cluster local` from that folder (the file found in the package). Its runs land in
    ./runs/demo-experiment, and `hpcdistill status runs/demo-experiment` there shows them."""
    shutil.copytree(tiny_dataset["shards"], tmp_path / "shards" / "demo")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpcdistill", "launch", "configs/experiments/demo.yaml", "--cluster", "local"],
        cwd=tmp_path,
        env=clean_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    exp_dir = tmp_path / "runs" / "demo-experiment"
    wait_for(proc, lambda: (exp_dir / "teacher" / "progress.json").is_file(), "the teacher's first progress")
    shown = subprocess.run(
        [sys.executable, "-m", "hpcdistill", "status", "runs/demo-experiment"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    ended_in_one_line(proc, signal.SIGINT)
    assert shown.returncode == 0 and "teacher" in shown.stdout and "RUNNING" in shown.stdout, shown.stdout
    assert json.loads((exp_dir / "launch.json").read_text())["exp_dir"] == str(exp_dir)
