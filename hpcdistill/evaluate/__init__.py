"""Scoring: the paper's metrics and bootstrap CIs, paired comparisons, method labels, evaluating an export on a shard
split, the report (tables and Figure 3) and the evaluation job."""

from hpcdistill.common.lazy_exports import lazy_exports

_EXPORTS = {
    "classification_metrics": "metrics",
    "bootstrap_ci": "metrics",
    "paired_bootstrap": "metrics",
    "gflops": "metrics",
    "evaluate_checkpoint": "evaluation",
    "paired_comparisons": "comparisons",
    "load_results": "report",
    "write_report": "report",
    "EvaluateTask": "task",
    "SLIDE_RULES": "aggregation",
    "unit_rows": "aggregation",
    "auroc_ci": "auroc",
    "score_unit": "unit_scores",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
