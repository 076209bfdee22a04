"""The experiment file, its job graph (shard, teacher, methods, evaluation), launching it, and the demo with its
record."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcdistill.experiment.demo import run_demo
    from hpcdistill.experiment.experiment_file import Experiment, load_experiment
    from hpcdistill.experiment.graph import plan_jobs
    from hpcdistill.experiment.launch import launch_experiment

__all__ = ["Experiment", "launch_experiment", "load_experiment", "plan_jobs", "run_demo"]
# Each name's module loads on first use (PEP 562): importing any module of this package runs this file, and
# planning and launching load no torch.
# The TYPE_CHECKING imports above are what type checkers and IDEs read.
_HOMES = {
    "run_demo": "demo",
    "Experiment": "experiment_file",
    "load_experiment": "experiment_file",
    "plan_jobs": "graph",
    "launch_experiment": "launch",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
