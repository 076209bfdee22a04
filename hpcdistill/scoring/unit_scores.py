"""The scores of one unit of evaluation (tissue, slide or patient rows): the paper's four metrics and AUROC with
bootstrap CIs resampled at that unit, per-class values, the confusion matrix, and the classes the rows lack. The
same record for `evaluate --unit` and for `predict --labels`."""

from __future__ import annotations

from typing import Any, Sequence

from hpcdistill.common.console import say
from hpcdistill.scoring.auroc import auroc_ci
from hpcdistill.scoring.cohort_checks import collapse_line, small_count_line
from hpcdistill.scoring.metrics import METRICS, bootstrap_ci, classification_metrics


def score_unit(
    rows: list[dict[str, Any]],
    classes: list[str],
    *,
    iterations: int,
    level: float,
    seed: int,
    groups: Sequence | None = None,
    unit: str = "tissue",
    kappa_weights: str = "unweighted",
) -> dict[str, Any]:
    """`rows`: {"y", "pred", "probs"} per `unit`; `groups` (tissue rows only): resample whole slides instead. The
    scores carry a collapse line and a small-cohort line (scoring.cohort_checks) where they apply."""
    k = len(classes)
    y, pred, probs = [r["y"] for r in rows], [r["pred"] for r in rows], [r["probs"] for r in rows]
    point = classification_metrics(y, pred, k, kappa_weights)
    ci = bootstrap_ci(y, pred, k, iterations, level, seed, groups, kappa_weights)
    auc = auroc_ci(y, probs, iterations=iterations, level=level, seed=seed)
    per_class = {m: [None if v != v else v for v in vals] for m, vals in point["per_class"].items()}
    per_class["auroc"] = [None if c is None else c[0] for c in auc["per_class"]]
    return {
        "n": len(rows),
        "kappa_weights": kappa_weights,
        "metrics": {m: list(ci[m]) for m in METRICS} | {"auroc": None if auc["macro"] is None else list(auc["macro"])},
        "auroc_per_class": {classes[c]: (None if v is None else list(v)) for c, v in enumerate(auc["per_class"])},
        "per_class": per_class,
        "confusion": point["confusion"],
        "absent_classes": [classes[c] for c in range(k) if c not in set(y)],
        "collapse": collapse_line(pred, classes, unit, y),
        "small": small_count_line(y, classes, unit),
    }


def absent_notice(unit: str, scores: dict[str, Any], where: str) -> str | None:
    """One line naming the classes a unit's rows lack (their recall, F1 and AUROC cannot be computed), or None."""
    absent = scores["absent_classes"]
    if not absent:
        return None
    return (
        f"{where}: no {unit} of class {', '.join(absent)} in the scored set: their recall, F1 and AUROC cannot be "
        "computed and are left out of the macro averages (shown as n/a)"
    )


def say_unit_notes(unit: str, scores: dict[str, Any], where: str) -> None:
    """The lines a unit's scores carry, each said once: absent classes, a collapsed model, a small cohort."""
    for line in (absent_notice(unit, scores, where), *(scores.get(k) for k in ("collapse", "small"))):
        if line:
            say(line if line.startswith(where) else f"{where}, {unit} level: {line}")
