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


class Payload:
    """Stands for any pickled object: loading it could run code, so a resume must refuse it."""
