"""Classifying new slides: per-slide prediction, class-activation maps, heat maps, QuPath GeoJSON, and prediction as an
array of tasks."""

from hpcdistill.common.lazy_exports import lazy_exports

_EXPORTS = {
    "predict_slides": "prediction",
    "PredictOptions": "prediction",
    "cam_logits": "cam",
    "write_geojson": "qupath",
    "plan_predictions": "array",
    "predict_jobs": "array",
    "score_cohort": "cohort_scores",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
