"""Classifying new slides: per-slide prediction, class-activation maps, heat maps, QuPath GeoJSON, prediction as an
array of tasks, and the dry run's plan."""

from hpcdistill.common.lazy_exports import lazy_exports

_EXPORTS = {
    "predict_slides": "prediction",
    "PredictOptions": "prediction",
    "cam_logits": "cam",
    "write_geojson": "qupath",
    "plan_predictions": "array",
    "predict_jobs": "array",
    "score_cohort": "cohort_scores",
    "preview_slides": "preview",
    "preview_lines": "preview",
    "PREDICT_RESULTS": "prediction",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
