"""Scoring, below every stage that scores: the paper's metrics and their bootstrap CIs, AUROC, slide and patient
aggregation, unit scores, method labels and forward-pass FLOPs. `train` (validation), `predict` (cohort scores) and
the evaluation stage import it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcdistill.scoring.aggregation import SLIDE_RULES, unit_rows
    from hpcdistill.scoring.auroc import auroc_ci
    from hpcdistill.scoring.flops import flops_per_mag, forward_flops, gflops
    from hpcdistill.scoring.method_labels import method_label
    from hpcdistill.scoring.metrics import bootstrap_ci, classification_metrics, paired_bootstrap
    from hpcdistill.scoring.unit_scores import score_unit

__all__ = [
    "SLIDE_RULES",
    "auroc_ci",
    "bootstrap_ci",
    "classification_metrics",
    "flops_per_mag",
    "forward_flops",
    "gflops",
    "method_label",
    "paired_bootstrap",
    "score_unit",
    "unit_rows",
]
# Each name's module loads on first use (PEP 562): importing any module of this package runs this file, and
# the metrics (numpy) do not load torch, which only the FLOP counter needs.
# The TYPE_CHECKING imports above are what type checkers and IDEs read.
_HOMES = {
    "SLIDE_RULES": "aggregation",
    "unit_rows": "aggregation",
    "auroc_ci": "auroc",
    "flops_per_mag": "flops",
    "forward_flops": "flops",
    "gflops": "flops",
    "method_label": "method_labels",
    "bootstrap_ci": "metrics",
    "classification_metrics": "metrics",
    "paired_bootstrap": "metrics",
    "score_unit": "unit_scores",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
