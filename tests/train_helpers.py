"""What the training tests share: sample counts, exported weights, a clean environment for child processes."""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def samples(dataset: dict, *splits: str) -> int:
    return sum(dataset["manifest"]["splits"][s]["samples"] for s in splits)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def clean_env() -> dict[str, str]:
    """The environment for a child `hpcdistill` process: one thread, CPU DeepSpeed, and none of the rendezvous
    variables this pytest process set for its own process group (its MASTER_PORT is taken)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def error_line(capsys) -> str:
    """The one stderr line of a failed command (anything before it, e.g. DeepSpeed's notices, is not ours)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("hpcdistill: error: "), lines[-5:]
    return lines[-1]


def scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one TensorBoard tag over every events file of a run (one file per start)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value if event.HasField("summary") else []:
                if value.tag == tag:
                    out[event.step] = value.tensor.float_val[0] if value.HasField("tensor") else value.simple_value
    return out


class Payload:
    """Stands for any pickled object: loading it could run code, so a resume must refuse it."""
