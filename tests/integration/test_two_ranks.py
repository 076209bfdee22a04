"""Two data-parallel ranks (torchrun, gloo on CPU) match one rank with twice the accumulation, in every mode."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hpcdistill.config.loading import load_config
from hpcdistill.train.build import build_student
from hpcdistill.train.run_folder import complete_checkpoints

REPO = Path(__file__).resolve().parents[2]


RANK_SCRIPT = """
    import os, sys, torch
    from hpcdistill.config.loading import load_config
    from hpcdistill.train.loop import fit
    from hpcdistill.train.build import build_trainer
    # several runs in one launch, separated by "--": the process group is set up once and reused
    runs, args = [], []
    for arg in sys.argv[1:] + ["--"]:
        if arg == "--":
            runs.append(args)
            args = []
        else:
            args.append(arg)
    for overrides in runs:
        cfg = load_config(None, overrides)
        trainer = build_trainer(cfg)
        fit(trainer)
        torch.save(trainer.engine.module.state_dict(), cfg.run_dir / f"rank{trainer.rank}.pt")
"""


@pytest.mark.slow
def rank_runs(tiny_dataset: dict, tiny_teacher: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The overrides every run shares, and each mode's own."""
    # ordered sampler: optimizer step s sees the same global samples for any world size
    common = [
        "data.sampler=ordered",
        "model.arch=resnet10",
        "model.width=8",
        "model.groups=4",
        "train.epochs=1",
        "log.progress=false",
        f"data.shards={tiny_dataset['shards']}",
        "data.mag=2.5",
        "model.stem=lowres",
        "teacher.min_val_accuracy=0",  # the tiny teacher trained for seconds: the gate has its own tests
    ]
    # all four modes; finetune starts from the baseline this same launch exported (its FC layer only trains)
    runs = {
        "baseline": ["train.mode=baseline", "data.epoch_samples=20"],
        "distill": [
            "train.mode=distill",
            f"teacher.checkpoint={tiny_teacher}",
            "data.aux=[aux1,aux2]",
            "data.epoch_samples=32",
        ],
        "finetune": ["train.mode=finetune", "model.init={out}/baseline/best.pt", "data.epoch_samples=20"],
        # a checkpoint at every step by the clock: rank 0 decides for both ranks (a split decision would hang)
        "teacher": [
            "train.mode=teacher",
            "model.stem=standard",
            "data.epoch_samples=20",
            "train.checkpoint_every_min=1e-9",
            "train.keep_last=10",
        ],
    }

    return common, runs


def run_both(script: Path, two_ranks: list[str], one_rank: list[str]) -> None:
    """The same runs under torchrun on two ranks, then on one rank with twice the accumulation."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with socket.socket() as sock:  # torchrun's --master_port=0 hangs DeepSpeed's shm comm setup: pass a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)]
    proc = subprocess.run(cmd + two_ranks, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, str(script)] + one_rank, env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_ranks_match_one_rank_in_every_mode(tiny_dataset, tiny_teacher, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    common, runs = rank_runs(tiny_dataset, tiny_teacher)

    def argv(out: Path, accum: int) -> list[str]:
        groups = [
            common
            + [e.format(out=out) for e in extra]
            + [f"run.out_dir={out}", f"run.name={mode}", f"train.grad_accum={accum}"]
            for mode, extra in runs.items()
        ]
        return [arg for group in groups for arg in group + ["--"]][:-1]

    two, one = tmp_path / "two", tmp_path / "one"
    run_both(script, argv(two, 2), argv(one, 4))
    for mode in runs:
        r0, r1, single = (
            torch.load(p / mode / f"rank{r}.pt", weights_only=True) for p, r in ((two, 0), (two, 1), (one, 0))
        )
        assert all(torch.equal(r0[k], r1[k]) for k in r0), mode  # data parallel keeps the replicas identical
        for k in r0:  # same global batch, same samples: the same update up to summation order
            torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5, msg=f"{mode}: {k}")
        if mode == "teacher":  # 20 samples, global batch 4: 5 steps, each checkpointed (4 by time, 1 at epoch end)
            for out in (two, one):
                names = [p.name for p in complete_checkpoints(out / mode / "checkpoints")]
                assert names == [f"step{s:09d}" for s in range(1, 6)], names
        if mode == "finetune":
            start = torch.load(two / "baseline" / "best.pt", weights_only=True)["state_dict"]
            moved = {k for k in r0 if not torch.equal(r0[k], start[k])}
            assert moved == {"fc.weight", "fc.bias"}, moved  # everything but the FC layer stayed frozen
            continue
        overrides = common + [e.format(out=two) for e in runs[mode]]
        init = build_student(load_config(None, overrides), tiny_dataset["manifest"]["classes"])
        assert any(not torch.equal(r0[k], v) for k, v in init.state_dict().items()), mode  # it really trained


def test_a_mid_epoch_resume_on_another_number_of_ranks_is_refused(tiny_dataset, tmp_path, capfd):
    """Saved by 2 ranks one step into an epoch, resumed on 1: each rank's position in its share of the epoch would
    skip or repeat samples, so the resume is refused in one line; the checkpoint stays resumable on 2 ranks."""
    from conftest import tiny_train_overrides

    from hpcdistill.cli import main

    overrides = tiny_train_overrides(tiny_dataset["shards"], tmp_path, "bl", "baseline", 2.5)
    config = load_config(None, [*overrides, "train.max_steps=1", "data.sampler=ordered"]).save(tmp_path / "bl.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    proc = subprocess.run(
        [*cmd, "-m", "hpcdistill", "train", str(config)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (saved,) = complete_checkpoints(tmp_path / "bl" / "checkpoints")
    assert main.main(["train", str(config), "train.max_steps=2"]) == 2  # one rank now
    (line,) = [ln for ln in capfd.readouterr().err.splitlines() if "rank(s) mid-epoch" in ln]
    assert str(saved) in line and "saved by 2 rank(s)" in line and "resuming with 1" in line
    assert complete_checkpoints(tmp_path / "bl" / "checkpoints") == [saved]  # nothing lost, nothing written
