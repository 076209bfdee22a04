"""Classifying new slides: per-slide prediction, class-activation maps, heat maps, QuPath GeoJSON, prediction as an
array of tasks, and the dry run's plan."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcdistill.predict.array import plan_predictions, predict_jobs
    from hpcdistill.predict.cam import cam_logits
    from hpcdistill.predict.cohort_scores import score_cohort
    from hpcdistill.predict.options import PredictOptions
    from hpcdistill.predict.prediction import PREDICT_RESULTS, predict_slides
    from hpcdistill.predict.preview import preview_lines, preview_slides
    from hpcdistill.predict.qupath import write_geojson

__all__ = [
    "PREDICT_RESULTS",
    "PredictOptions",
    "cam_logits",
    "plan_predictions",
    "predict_jobs",
    "predict_slides",
    "preview_lines",
    "preview_slides",
    "score_cohort",
    "write_geojson",
]
# Each name's module loads on first use (PEP 562): importing any module of this package runs this file, and
# `predict --help` and the dry run load no model code.
# The TYPE_CHECKING imports above are what type checkers and IDEs read.
_HOMES = {
    "plan_predictions": "array",
    "predict_jobs": "array",
    "cam_logits": "cam",
    "score_cohort": "cohort_scores",
    "PREDICT_RESULTS": "prediction",
    "PredictOptions": "options",
    "predict_slides": "prediction",
    "preview_lines": "preview",
    "preview_slides": "preview",
    "write_geojson": "qupath",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
