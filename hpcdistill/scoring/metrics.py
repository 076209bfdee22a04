"""Balanced and top-1 accuracy, the paper's §4.4 metrics (one-vs-rest macro accuracy/F1/precision/recall) and their
bootstrap CIs (FLOPs: flops.py). Balanced accuracy is scikit-learn's (the mean recall over the classes the labels hold).


Convention for absent classes. A class is *present* in a sample set when it occurs in y_true or in y_pred
-- the label set scikit-learn uses by default. Macro averages run over the present classes only; within
them an undefined ratio (0/0, e.g. a class never predicted) counts as 0 (sklearn's zero_division=0). So
the macro precision, recall and F1 here equal sklearn's `precision_recall_fscore_support(average="macro",
zero_division=0)` on any input, and a class missing from a bootstrap resample is left out of that
resample's averages: it never crashes and never counts as 1.0. OvR accuracy (TP_c+TN_c)/N uses the same
class set (an absent class would score TN/N = 1.0 and inflate it). Per-class lists hold NaN for absent
classes, so each macro value equals the NaN-mean of its per-class list.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from hpcdistill.common.errors import ScoringError
from hpcdistill.common.limits import limit, raise_hint
from hpcdistill.common.signals import check_interrupted

# What a reader expects first: balanced accuracy (the mean per-class recall, chance = 1/K whatever the class mix) and
# top-1 accuracy (the fraction called right); then the paper's four, its "accuracy" being the macro one-vs-rest
# (TP_c + TN_c) / N, which a constant predictor scores ((K - 1)^2 + 1) / K^2 on with K balanced classes (5/9 for 3).
METRICS = ("balanced_accuracy", "top1", "accuracy", "f1", "precision", "recall", "kappa")
# Cohen's kappa: agreement beyond chance; quadratic weights where the classes are an ordered scale
# (data.ordinal_classes, e.g. normal < duodenitis < celiac), so calling celiac "normal" costs more than "duodenitis".
KAPPA_WEIGHTS = ("unweighted", "quadratic")


def kappa_weights_for(ordinal_classes: Sequence[str]) -> str:
    """Quadratic where the classes are declared an ordered scale (data.ordinal_classes, checked against the
    manifest's class order when the run trained), else unweighted."""
    return "quadratic" if ordinal_classes else "unweighted"


def kappa_weights_of(config: dict) -> str:
    """The kappa weights a run's config declares, from its dict form as an export records it."""
    return kappa_weights_for((config.get("data") or {}).get("ordinal_classes") or [])


PER_CLASS = ("accuracy", "f1", "precision", "recall")  # the one-vs-rest metrics have a value per class
METRIC_TITLES = {  # each metric's name wherever a person reads it (reports, terminal lines)
    "balanced_accuracy": "Balanced accuracy",
    "top1": "Top-1 accuracy",
    "accuracy": "OvR accuracy (paper)",
    "f1": "F1-Score",
    "precision": "Precision",
    "recall": "Recall",
    "kappa": "Cohen's kappa ×100",
    "auroc": "AUROC",
}
CHUNK_ELEMS = 4_000_000  # resampling indices held in memory at once by bootstrap_ci (~32 MB of int64)


def _labels(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.ndim != 1 or t.shape != p.shape:
        raise ScoringError(f"metrics: y_true and y_pred must be 1-D of equal length, got {t.shape} and {p.shape}")
    if t.size == 0:
        raise ScoringError("metrics: no samples to evaluate")
    for name, y in (("y_true", t), ("y_pred", p)):
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
            raise ScoringError(f"metrics: {name} must hold integer class indices in [0, {num_classes})")
    return t.astype(np.int64), p.astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den with 0/0 -> 0 (sklearn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def kappa_weight_matrix(num_classes: int, weights: str) -> np.ndarray:
    """(K, K) disagreement weights: 1 off the diagonal (unweighted), or ((i - j) / (K - 1))^2 (quadratic)."""
    if weights not in KAPPA_WEIGHTS:
        raise ScoringError(f"kappa weights: {weights!r} is not one of {', '.join(KAPPA_WEIGHTS)}")
    i, j = np.indices((num_classes, num_classes))
    if weights == "unweighted" or num_classes < 2:
        return (i != j).astype(np.float64)
    return ((i - j) / (num_classes - 1)) ** 2


def kappa_from_confusions(conf: np.ndarray, weights: str = "unweighted") -> np.ndarray:
    """Cohen's kappa 1 - sum(w O) / sum(w E) of each confusion matrix (..., K, K), E the chance agreement from its
    margins: scikit-learn's cohen_kappa_score. Where chance disagreement is 0 (labels and calls all one class) kappa
    is undefined and counts as 0 (no agreement beyond chance can be shown), like the 0/0 ratios above."""
    conf = conf.astype(np.float64)
    w = kappa_weight_matrix(conf.shape[-1], weights)
    n = conf.sum(axis=(-2, -1))
    expected = conf.sum(axis=-1)[..., :, None] * conf.sum(axis=-2)[..., None, :] / np.maximum(n, 1)[..., None, None]
    observed_d, expected_d = (conf * w).sum(axis=(-2, -1)), (expected * w).sum(axis=(-2, -1))
    return np.where(expected_d > 0, 1 - _ratio(observed_d, expected_d), 0.0)


def metrics_from_confusions(conf: np.ndarray, kappa_weights: str = "unweighted") -> dict[str, np.ndarray]:
    """Batched OvR metrics from confusion matrices conf[..., true, pred].

    Returns per-class arrays (..., K) (NaN for absent classes) under "per_class_<metric>" and macro
    values (...) under each metric name.
    """
    conf = conf.astype(np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    n_true, n_pred = conf.sum(axis=-1), conf.sum(axis=-2)
    fp, fn = n_pred - tp, n_true - tp
    n = conf.sum(axis=(-2, -1))[..., None]
    present = (n_true + n_pred) > 0
    per_class = {
        "accuracy": (n - fp - fn) / n,  # (TP + TN) / N
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    out: dict[str, np.ndarray] = {}
    n_present = present.sum(axis=-1)  # >= 1 whenever N > 0
    for name, values in per_class.items():
        values = np.where(present, values, np.nan)
        out["per_class_" + name] = values
        out[name] = np.where(present, values, 0.0).sum(axis=-1) / n_present
    labelled = n_true > 0  # scikit-learn's balanced accuracy: the recall of each class the labels hold
    out["balanced_accuracy"] = np.where(labelled, _ratio(tp, n_true), 0.0).sum(axis=-1) / labelled.sum(axis=-1)
    out["top1"] = tp.sum(axis=-1) / n[..., 0]
    out["kappa"] = kappa_from_confusions(conf, kappa_weights)
    return out


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    num_classes: int,
    kappa_weights: str = "unweighted",
) -> dict:
    """{"balanced_accuracy", "top1": fractions; "accuracy", "f1", "precision", "recall": macro OvR fractions;
    "kappa": Cohen's kappa with `kappa_weights`; "per_class": {OvR metric: [K floats], "support": [K ints]},
    "confusion": K x K list (rows true, columns predicted)}. See module docstring."""
    t, p = _labels(y_true, y_pred, num_classes)
    conf = confusion_matrix(t, p, num_classes)
    m = metrics_from_confusions(conf, kappa_weights)
    result: dict = {name: float(m[name]) for name in METRICS}
    result["per_class"] = {name: [float(v) for v in m["per_class_" + name]] for name in PER_CLASS}
    result["per_class"]["support"] = [int(v) for v in conf.sum(axis=1)]
    result["confusion"] = conf.tolist()
    return result


def bootstrap_indices(n: int, iterations: int, seed: int, chunk_elems: int | None = None) -> Iterator[np.ndarray]:
    """Yield (rows, n) blocks of resampling indices (with replacement), `iterations` rows in all.

    Blocks keep memory at ~`chunk_elems` (default CHUNK_ELEMS) indices. The stream depends only on
    (n, iterations, seed, chunk_elems), so a slow reference loop can replay exactly the same resamples.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, (chunk_elems or CHUNK_ELEMS) // max(n, 1))
    for start in range(0, iterations, rows):
        check_interrupted()  # a block is a fraction of a second: SIGTERM ends a long bootstrap at once
        yield rng.integers(0, n, size=(min(rows, iterations - start), n))


def _resampled_confusions(
    t: np.ndarray, p: np.ndarray, num_classes: int, iterations: int, seed: int, groups: Sequence | np.ndarray | None
) -> Iterator[np.ndarray]:
    """Blocks of (rows, K, K) confusion matrices, one per resample: of samples, or of whole groups when given."""
    kk = num_classes**2
    codes = t * num_classes + p
    if groups is None:
        for idx in bootstrap_indices(codes.size, iterations, seed):
            rows = idx.shape[0]
            flat = (np.arange(rows)[:, None] * kk + codes[idx]).ravel()
            yield np.bincount(flat, minlength=rows * kk).reshape(rows, num_classes, num_classes)
        return
    g = np.asarray(groups)
    if g.shape != t.shape:
        raise ScoringError(f"groups: need one group id per sample, got {g.shape} for {t.shape}")
    _, gid = np.unique(g, return_inverse=True)
    n_units = int(gid.max()) + 1
    # (groups, K*K): each group's confusion counts; a resample's confusion is a count-weighted sum.
    unit_conf = np.zeros((n_units, kk), dtype=np.float64)
    np.add.at(unit_conf, (gid, codes), 1.0)
    for idx in bootstrap_indices(n_units, iterations, seed):
        rows = idx.shape[0]
        counts = np.bincount((np.arange(rows)[:, None] * n_units + idx).ravel(), minlength=rows * n_units).reshape(
            rows, n_units
        )
        yield (counts @ unit_conf).reshape(rows, num_classes, num_classes)


def check_iterations(iterations: int) -> None:
    """A positive count within the `bootstrap_iterations` limit: each resample keeps one number per metric, so the
    memory is bounded by the limit (about 40 MB at a million), and the time with it."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ScoringError(f"iterations: must be a positive integer, got {iterations!r}")
    if iterations > limit("bootstrap_iterations"):
        raise ScoringError(f"iterations: {iterations:,} resamples ({raise_hint('bootstrap_iterations')})")


def bootstrap_ci(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    num_classes: int,
    iterations: int = 10000,
    level: float = 0.95,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
    kappa_weights: str = "unweighted",
) -> dict[str, tuple[float, float, float]]:
    """{metric: (point estimate on the full data, low, high)}: percentile bootstrap interval at `level`.

    Plain resampling of samples with replacement, vectorised: each block of resamples becomes a batch of
    confusion matrices via one bincount over offsets (row*K*K + true*K + pred). 10,000 x 2,000 takes
    about 0.1 s on one core (bench/bench_metrics.py).

    `groups` (optional, one id per sample, e.g. the slide) switches to a cluster bootstrap that resamples
    whole groups, the honest choice when many samples come from the same slide.

    Differences from the authors' public script: it resampled class-balanced (equal draws per class) and
    scored accuracy as total/(total+FP+FN); here resampling is plain (the test set's class mix varies as
    it would between test sets) and accuracy is the macro OvR (TP_c+TN_c)/N of §4.4.
    """
    t, p = _labels(y_true, y_pred, num_classes)
    if not 0 < level < 1:
        raise ScoringError(f"confidence: must be in (0, 1), got {level!r}")
    check_iterations(iterations)
    stats = {name: [] for name in METRICS}
    for conf in _resampled_confusions(t, p, num_classes, iterations, seed, groups):
        m = metrics_from_confusions(conf, kappa_weights)
        for name in METRICS:
            stats[name].append(m[name])
    point = metrics_from_confusions(confusion_matrix(t, p, num_classes), kappa_weights)
    q = [50 * (1 - level), 50 * (1 + level)]
    out = {}
    for name in METRICS:
        low, high = np.percentile(np.concatenate(stats[name]), q)
        out[name] = (float(point[name]), float(low), float(high))
    return out


def paired_differences(
    y_true: Sequence[int] | np.ndarray,
    pred_a: Sequence[int] | np.ndarray,
    pred_b: Sequence[int] | np.ndarray,
    num_classes: int,
    iterations: int = 10000,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
    kappa_weights: str = "unweighted",
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Method a minus method b on the same samples: ({metric: difference on all samples}, {metric: the difference
    on each resample}). Both are scored on the same resampled index sets (of samples, or of whole `groups`), so the
    spread is that of the difference itself, without the shared difficulty of the samples."""
    t, a = _labels(y_true, pred_a, num_classes)
    _, b = _labels(y_true, pred_b, num_classes)
    check_iterations(iterations)
    diffs: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
    for conf_a, conf_b in zip(
        _resampled_confusions(t, a, num_classes, iterations, seed, groups),
        _resampled_confusions(t, b, num_classes, iterations, seed, groups),
    ):
        ma, mb = metrics_from_confusions(conf_a, kappa_weights), metrics_from_confusions(conf_b, kappa_weights)
        for name in METRICS:
            diffs[name].append(ma[name] - mb[name])
    full_a = metrics_from_confusions(confusion_matrix(t, a, num_classes), kappa_weights)
    full_b = metrics_from_confusions(confusion_matrix(t, b, num_classes), kappa_weights)
    return (
        {name: float(full_a[name] - full_b[name]) for name in METRICS},
        {name: np.concatenate(diffs[name]) for name in METRICS},
    )


def difference_ci(point: float, resampled: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """(difference, low, high, fraction of resamples with difference <= 0: a one-sided bootstrap p-value)."""
    low, high = np.percentile(resampled, [50 * (1 - level), 50 * (1 + level)])
    return float(point), float(low), float(high), float(np.mean(resampled <= 0))


def paired_bootstrap(
    y_true: Sequence[int] | np.ndarray,
    pred_a: Sequence[int] | np.ndarray,
    pred_b: Sequence[int] | np.ndarray,
    num_classes: int,
    iterations: int = 10000,
    level: float = 0.95,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
) -> dict[str, tuple[float, float, float, float]]:
    """{metric: (a - b, low, high, P(a - b <= 0))}: the paired-bootstrap CI of the difference between two methods
    scored on the same samples."""
    point, resampled = paired_differences(y_true, pred_a, pred_b, num_classes, iterations, seed, groups)
    return {name: difference_ci(point[name], resampled[name], level) for name in METRICS}
