"""This process's place among the ranks, read from the environment torchrun and the SLURM launcher set (RANK,
LOCAL_RANK, WORLD_SIZE). Torch-free, so the run folder, messages and the launcher agree on rank 0 without torch;
the process group itself is train.distributed's."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return rank() == 0
