"""What the launch tests share: a tiny experiment file, the CPU resources, the sharder's small shards as a fixture,
and readers of TensorBoard steps and sacct histories."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import sacct_wait_final

from hpcdistill.common.errors import LaunchError
from hpcdistill.experiment.experiment_file import load_experiment

REPO = Path(__file__).resolve().parents[1]
# Tiny network, few steps, CPU fp32; every phase of configs/demo runs in seconds.
TINY = [
    "model.width=8",
    "model.groups=4",
    "train.epochs=1",
    "train.grad_accum=1",
    "log.progress=false",
    "data.sampler=ordered",
    "log.log_every=1",
    "teacher.min_val_accuracy=0",  # a teacher of one tiny epoch cannot pass the demo's gate: it has its own tests
]
CPU = {
    "nodes": 1,
    "gpus_per_node": 0,
    "tasks_per_node": 1,
    "cpus_per_task": 1,
    "mem_gb": 2,
    "timeout_min": 10,
    "signal_delay_s": 30,
    "max_requeue": 3,
}


def write_experiment(tmp: Path, name: str = "exp", **over) -> Path:
    exp = {
        "name": name,
        "out_dir": str(tmp / "runs"),
        "shards": str(tmp / "shards"),
        "mags": [5, 2.5],
        "teacher": {"config": "configs/demo/teacher.yaml", "overrides": list(TINY)},
        "methods": {
            "baseline": {"config": "configs/demo/baseline.yaml", "label": "Baseline", "overrides": list(TINY)},
            "kd": {"config": "configs/demo/distill.yaml", "label": "KD", "overrides": list(TINY)},
            "kd_ft": {
                "config": "configs/demo/finetune.yaml",
                "label": "KD+FT",
                "init_from": "kd",
                "overrides": list(TINY),
            },
        },
        "evaluate": {"split": "test", "iterations": 100},
        "resources": {
            "default": dict(CPU, partition="gpu-long", account="lab42", sbatch={"exclusive": True}),
            "teacher": {"nodes": 2, "tasks_per_node": 2},
        },
    }
    exp.update(over)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def error_of(tmp: Path, **over) -> str:
    with pytest.raises(LaunchError) as info:
        load_experiment(write_experiment(tmp, **over))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def launch_shards(small_dataset) -> Path:
    """The real sharder's output on small synthetic slides (mags 10, 5 and 2.5; several uneven shards per split)."""
    return small_dataset["shards"]


def tiny_experiment(tmp: Path, shards: Path, name: str, methods: dict, **over) -> Path:
    path = write_experiment(tmp, name=name, shards=str(shards), methods=methods, **over)
    return path


def logged_steps(tb_dir: Path) -> list[list[int]]:
    """loss/total steps of each TensorBoard event file (one file per run of the job), in run order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    runs = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        steps = [
            e.step
            for e in EventFileLoader(str(path)).Load()
            if e.HasField("summary") and any(v.tag == "loss/total" for v in e.summary.value)
        ]
        if steps:
            runs.append(steps)
    return runs


def final_history(job_id: str, timeout_s: float = 60) -> list[str]:
    """sacct's states for every run of a job, once the last one is final."""
    return [state for state, _ in sacct_wait_final(job_id, timeout_s)]


def check_resumed_runs(task: dict, every: int, runs_expected: int) -> tuple[list[int], list[list[int]]]:
    """Each rerun of the job loaded the latest checkpoint and went on from the step after it; only the steps between
    that checkpoint and the kill were done twice."""
    log = Path(task["stdout"]).read_text()
    resumed = [int(m) for m in re.findall(r"resuming from \S*/step(\d+)", log)]
    assert log.count("starting fresh") == 1 and len(resumed) == runs_expected - 1, log[-2000:]
    runs = logged_steps(Path(task["tensorboard"]))
    assert len(runs) == runs_expected
    for before, after, start in zip(runs, runs[1:], resumed):
        assert start >= every and start % every == 0  # a checkpoint written by the run before
        assert after[0] == start + 1  # the rerun continues right after the checkpoint it loaded
        assert 0 <= before[-1] - start <= every  # only the steps after the last checkpoint were done twice
    return resumed, runs
