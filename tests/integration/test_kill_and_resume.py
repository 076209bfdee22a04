"""A training process killed mid-run (SIGKILL) and resumed gives the uninterrupted run bit for bit."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import cfg_for
from train_helpers import clean_env, weights

from hpcdistill.train import loop
from hpcdistill.train.run_folder import complete_checkpoints

REPO = Path(__file__).resolve().parents[2]


def test_kill_and_resume_is_bit_identical(tiny_dataset, tmp_path):
    extra = (
        "train.epochs=8",
        "train.checkpoint_every_steps=3",
        "train.keep_last=2",
        "data.sampler=resampled",
        "data.shuffle_buffer=3",
        "data.epoch_samples=12",
    )  # 6 steps per epoch, 48 in all
    full = loop.run(cfg_for(tiny_dataset, tmp_path, "full", "baseline", 2.5, *extra))
    # The same run as a `hpcdistill train` process, SIGKILLed right after its first mid-epoch checkpoint (step 3).
    cfg = cfg_for(tiny_dataset, tmp_path, "part", "baseline", 2.5, *extra)
    config = cfg.save(tmp_path / "part.yaml")
    ckpts = tmp_path / "part" / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpcdistill.cli.main", "train", str(config)],
        env=clean_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (first := complete_checkpoints(ckpts)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert first[0].name == "step000000003"  # mid-epoch: the kill came after it, somewhere in steps 3..48
    assert not (tmp_path / "part" / "last.pt").exists()  # killed mid-run: nothing final was written
    (ckpts / "step999999999").mkdir()  # a save killed midway: no completion marker, must be ignored
    rest = loop.run(cfg)
    assert rest["global_step"] == full["global_step"] == 48
    a, b = weights(Path(full["last_path"])), weights(Path(rest["last_path"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rest["best"] == full["best"] and rest["best_step"] == full["best_step"]
    complete = [p.name for p in complete_checkpoints(ckpts)]
    assert len(complete) == 2 and complete[-1] == "step000000048"  # keep_last
    # A requeue that lands after the last step (the time-limit signal came during export) reruns a finished run:
    # it must load the final checkpoint and return the same result without training or exporting anything new.
    last_written = Path(rest["last_path"]).stat().st_mtime_ns
    again = loop.run(cfg)
    assert Path(again["last_path"]).stat().st_mtime_ns == last_written  # not re-exported
    assert again["global_step"] == 48 and not again["stopped_early"]
    assert again["best"] == rest["best"] and again["best_step"] == rest["best_step"]
    c = weights(Path(again["last_path"]))
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert [p.name for p in complete_checkpoints(ckpts)] == complete
