"""Training: the trainer and its state, building a run, resuming it, checkpoints and exports and the run folder they
live in, the loop, validation and export selection, the weight average, the stop on a non-finite loss, the process
group, the DeepSpeed config, the losses, the budget and its schedule, the teacher gate and the training job."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcdistill.train.budget import budget_line, stop_reason
    from hpcdistill.train.ds_config import build_ds_config
    from hpcdistill.train.loop import main_train, run
    from hpcdistill.train.losses import distill_loss, pixel_loss, soft_loss
    from hpcdistill.train.run_folder import RunFolder, complete_checkpoints
    from hpcdistill.train.task import TrainTask
    from hpcdistill.train.teacher_gate import check_teacher

__all__ = [
    "RunFolder",
    "TrainTask",
    "budget_line",
    "build_ds_config",
    "check_teacher",
    "complete_checkpoints",
    "distill_loss",
    "main_train",
    "pixel_loss",
    "run",
    "soft_loss",
    "stop_reason",
]
# Each name's module loads on first use (PEP 562): importing any module of this package runs this file, and
# the launcher imports train.task without torch or DeepSpeed.
# The TYPE_CHECKING imports above are what type checkers and IDEs read.
_HOMES = {
    "budget_line": "budget",
    "stop_reason": "budget",
    "build_ds_config": "ds_config",
    "main_train": "loop",
    "run": "loop",
    "distill_loss": "losses",
    "pixel_loss": "losses",
    "soft_loss": "losses",
    "RunFolder": "run_folder",
    "complete_checkpoints": "run_folder",
    "TrainTask": "task",
    "check_teacher": "teacher_gate",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
