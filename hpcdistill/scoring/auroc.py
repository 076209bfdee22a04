"""One-vs-rest AUROC per class and its macro average, with percentile bootstrap CIs, vectorised over resamples.

AUROC of class c is the Mann-Whitney statistic of the class-c probability between the samples of class c and the
others (ties count a half): the area under the ROC curve scikit-learn's `roc_auc_score` computes. A class without a
positive or without a negative sample (in the data, or in one resample) has no AUROC: it is NaN there and the
macro average runs over the classes that have one, the same rule the other metrics follow for absent classes."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import rankdata

from hpcdistill.scoring.metrics import bootstrap_indices


def _auroc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(rows, n) labels 0/1 and scores -> (rows,) AUROC; NaN where a row lacks positives or negatives."""
    ranks = rankdata(scores, axis=1)
    positives = y.sum(axis=1)
    negatives = y.shape[1] - positives
    u = (ranks * y).sum(axis=1) - positives * (positives + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((positives > 0) & (negatives > 0), u / (positives * negatives), np.nan)


def _per_class(y_true: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(rows, classes) AUROC for resample index rows `idx`."""
    return np.stack([_auroc((y_true[idx] == c).astype(np.float64), probs[idx, c]) for c in range(probs.shape[1])], 1)


def _macro(per_class: np.ndarray) -> np.ndarray:
    defined = ~np.isnan(per_class)
    counts = defined.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.nansum(per_class, axis=1) / counts, np.nan)


def auroc_ci(
    y_true: Sequence[int], probs: Sequence[Sequence[float]], iterations: int = 10000, level: float = 0.95, seed: int = 0
) -> dict[str, object]:
    """{"macro": (point, low, high), "per_class": [(point, low, high) or None], "undefined": [class ids]}: None and
    "undefined" name the classes with no AUROC on the full data (no positive or no negative sample)."""
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    point = _per_class(y, p, np.arange(len(y))[None])[0]
    samples = [(_per_class(y, p, idx)) for idx in bootstrap_indices(len(y), iterations, seed)]
    resampled = np.concatenate(samples)
    q = [50 * (1 - level), 50 * (1 + level)]

    def interval(values: np.ndarray, at: float) -> tuple[float, float, float] | None:
        finite = values[~np.isnan(values)]
        if np.isnan(at) or not finite.size:
            return None
        low, high = np.percentile(finite, q)
        return float(at), float(low), float(high)

    per_class = [interval(resampled[:, c], point[c]) for c in range(p.shape[1])]
    macro = interval(_macro(resampled), float(_macro(point[None])[0]))
    return {"macro": macro, "per_class": per_class, "undefined": [c for c in range(p.shape[1]) if np.isnan(point[c])]}
