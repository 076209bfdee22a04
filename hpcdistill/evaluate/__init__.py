"""The evaluation stage, beside training: scoring an export on a shard split (`EvalOptions`, the evaluation record),
paired comparisons of methods, the report (tables and Figure 3) and the evaluation job. The metrics it scores with
are `scoring`'s."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcdistill.evaluate.comparisons import paired_comparisons
    from hpcdistill.evaluate.evaluation import evaluate_checkpoint
    from hpcdistill.evaluate.report import load_results, write_report
    from hpcdistill.evaluate.task import EvaluateTask

__all__ = ["EvaluateTask", "evaluate_checkpoint", "load_results", "paired_comparisons", "write_report"]
# Each name's module loads on first use (PEP 562): importing any module of this package runs this file, and
# the evaluation job's launcher side (task.py) loads no torch.
# The TYPE_CHECKING imports above are what type checkers and IDEs read.
_HOMES = {
    "paired_comparisons": "comparisons",
    "evaluate_checkpoint": "evaluation",
    "load_results": "report",
    "write_report": "report",
    "EvaluateTask": "task",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
