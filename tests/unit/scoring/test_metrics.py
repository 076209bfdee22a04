from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support
from torch import nn

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.models.resnet import build_model
from hpcdistill.scoring import metrics
from hpcdistill.scoring.flops import forward_flops, gflops, gmacs
from hpcdistill.scoring.metrics import METRICS, PER_CLASS, bootstrap_ci, bootstrap_indices, classification_metrics


def test_hand_worked_example() -> None:
    # confusion rows (true) = [[2,1,0],[0,1,1],[0,0,1]]; TP=[2,1,1], FP=[0,1,1], FN=[1,1,0], N=6
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 3)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["per_class"]["accuracy"] == pytest.approx([5 / 6, 4 / 6, 5 / 6])
    assert m["per_class"]["precision"] == pytest.approx([1.0, 0.5, 0.5])
    assert m["per_class"]["recall"] == pytest.approx([2 / 3, 0.5, 1.0])
    assert m["per_class"]["f1"] == pytest.approx([0.8, 0.5, 2 / 3])
    assert m["per_class"]["support"] == [3, 2, 1]
    assert m["accuracy"] == pytest.approx(7 / 9)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(13 / 18)
    assert m["f1"] == pytest.approx(59 / 90)


def test_perfect_and_all_wrong() -> None:
    m = classification_metrics([0, 1, 2, 1], [0, 1, 2, 1], 3)
    assert all(m[k] == 1.0 for k in METRICS)
    m = classification_metrics([0, 0, 1, 1], [1, 1, 0, 0], 2)
    assert all(m[k] == 0.0 for k in METRICS if k != "kappa")
    assert m["kappa"] == -1.0  # systematic disagreement: as far below chance as it can be


@pytest.mark.parametrize("seed", range(6))
def test_macro_precision_recall_f1_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    n = int(rng.integers(5, 60))
    y_true = rng.integers(0, k, n)
    # Mix of right and wrong, and with seed >= 3 a class that is never predicted (precision 0/0 -> 0).
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, k, n))
    if seed >= 3:
        y_pred[y_pred == 0] = 1
    m = classification_metrics(y_true, y_pred, k)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((p, r, f), abs=1e-12)
    if len(set(y_true) | set(y_pred)) == k:  # all classes present: same as sklearn with labels=range(k)
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=list(range(k)), average="macro", zero_division=0
        )
        assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((p, r, f), abs=1e-12)


def test_macro_ovr_accuracy_identity() -> None:
    # Sum over classes of (FP_c + FN_c) is twice the error count, so macro OvR accuracy = 1 - 2E/(K N).
    rng = np.random.default_rng(11)
    y_true, y_pred = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    errors = int((y_true != y_pred).sum())
    assert classification_metrics(y_true, y_pred, 4)["accuracy"] == pytest.approx(1 - 2 * errors / (4 * 50))


def test_balanced_and_top1_accuracy_equal_scikit_learns() -> None:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    rng = np.random.default_rng(5)
    for k in (2, 3, 5):
        y_true, y_pred = rng.integers(0, k, 80), rng.integers(0, k, 80)
        y_pred[:10] = 0  # a class predicted that some resamples lack
        m = classification_metrics(y_true, y_pred, k)
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
        assert m["top1"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    # a model that calls everything one class: OvR accuracy flatters it, balanced accuracy is at chance
    constant = classification_metrics([0, 1, 2] * 10, [1] * 30, 3)
    assert constant["balanced_accuracy"] == pytest.approx(1 / 3) and constant["top1"] == pytest.approx(1 / 3)
    assert constant["accuracy"] == pytest.approx(5 / 9)  # (TP + TN) / N, averaged over the classes present


def test_absent_class_is_excluded_not_scored_one() -> None:
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    three = classification_metrics(y_true, y_pred, 3)
    four = classification_metrics(y_true, y_pred, 4)  # class 3: no true and no predicted samples
    for k in METRICS:
        assert four[k] == pytest.approx(three[k]), k
    for k in PER_CLASS:
        assert math.isnan(four["per_class"][k][3])
        assert four[k] == pytest.approx(np.nanmean(four["per_class"][k]))
    assert four["per_class"]["support"][3] == 0
    assert four["confusion"][3] == [0, 0, 0, 0]
    # Class 2 occurs in y_true but is never predicted: it stays in, with precision 0 (never 1.0).
    assert three["per_class"]["precision"][2] == 0.0 and three["per_class"]["recall"][2] == 0.0


def test_bad_labels() -> None:
    with pytest.raises(HpcdistillError, match=r"y_pred.*\[0, 3\)"):
        classification_metrics([0, 1], [0, 3], 3)
    with pytest.raises(HpcdistillError, match="equal length"):
        classification_metrics([0, 1], [0], 3)
    with pytest.raises(HpcdistillError, match="no samples"):
        bootstrap_ci([], [], 3)
    with pytest.raises(HpcdistillError, match="confidence"):
        bootstrap_ci([0, 1], [0, 1], 2, level=95)


def test_bootstrap_point_and_interval_shape() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 3, 300))
    ci = bootstrap_ci(y_true, y_pred, 3, iterations=500, seed=1)
    point = classification_metrics(y_true, y_pred, 3)
    assert set(ci) == set(METRICS)
    for k, (p, lo, hi) in ci.items():
        assert p == pytest.approx(point[k])
        assert lo < p < hi and hi - lo < 0.25
    assert bootstrap_ci(y_true, y_pred, 3, iterations=500, seed=1) == ci  # deterministic for a seed
    assert bootstrap_ci(y_true, y_pred, 3, iterations=500, seed=2) != ci
    wide = bootstrap_ci(y_true, y_pred, 3, iterations=500, seed=1, level=0.99)
    assert all(wide[k][1] <= ci[k][1] and wide[k][2] >= ci[k][2] for k in METRICS)


def slow_percentiles(
    y_true: np.ndarray, y_pred: np.ndarray, k: int, resamples: list[np.ndarray], level: float
) -> dict[str, tuple[float, float]]:
    values = {name: [] for name in METRICS}
    for idx in resamples:
        m = classification_metrics(y_true[idx], y_pred[idx], k)
        for name in METRICS:
            values[name].append(m[name])
    q = [50 * (1 - level), 50 * (1 + level)]
    return {name: tuple(np.percentile(v, q)) for name, v in values.items()}


def test_bootstrap_vectorised_equals_slow_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 4, 25)
    y_pred = np.where(rng.random(25) < 0.5, y_true, rng.integers(0, 4, 25))
    monkeypatch.setattr(metrics, "CHUNK_ELEMS", 25 * 7)  # 7 resamples per block: exercises block edges
    resamples = [row for block in bootstrap_indices(25, 60, seed=5) for row in block]
    assert len(resamples) == 60
    slow = slow_percentiles(y_true, y_pred, 4, resamples, 0.9)
    fast = bootstrap_ci(y_true, y_pred, 4, iterations=60, level=0.9, seed=5)
    for name in METRICS:
        assert fast[name][1:] == pytest.approx(slow[name], abs=1e-12), name


def test_grouped_bootstrap_equals_slow_loop() -> None:
    rng = np.random.default_rng(4)
    slide = np.repeat(np.array(["s3", "s1", "s7", "s2", "s9"]), [4, 6, 2, 5, 3])  # 5 slides, 20 tissues
    y_true = rng.integers(0, 3, 20)
    y_pred = np.where(rng.random(20) < 0.6, y_true, rng.integers(0, 3, 20))
    names, gid = np.unique(slide, return_inverse=True)
    members = [np.flatnonzero(gid == g) for g in range(len(names))]
    resamples = [
        np.concatenate([members[g] for g in row]) for block in bootstrap_indices(5, 40, seed=2) for row in block
    ]
    slow = slow_percentiles(y_true, y_pred, 3, resamples, 0.95)
    fast = bootstrap_ci(y_true, y_pred, 3, iterations=40, seed=2, groups=slide)
    for name in METRICS:
        assert fast[name][1:] == pytest.approx(slow[name], abs=1e-12), name
    with pytest.raises(HpcdistillError, match="groups"):
        bootstrap_ci(y_true, y_pred, 3, groups=slide[:-1])


def test_bootstrap_coverage_simulation() -> None:
    """Percentile intervals around a known population value contain it ~95% of the time.

    K=3 balanced classes, each prediction right with probability a, else a uniform wrong class: by symmetry
    every class has precision, recall and F1 a, and the macro OvR accuracy is 1 - 2(1 - a)/K.
    """
    k, n, a, repeats = 3, 240, 0.75, 200
    truth = {"accuracy": 1 - 2 * (1 - a) / k, "recall": a, "precision": a, "f1": a}
    rng = np.random.default_rng(123)
    hits = {name: 0 for name in truth}
    for rep in range(repeats):
        y_true = rng.integers(0, k, n)
        wrong = (y_true + rng.integers(1, k, n)) % k
        y_pred = np.where(rng.random(n) < a, y_true, wrong)
        ci = bootstrap_ci(y_true, y_pred, k, iterations=1000, seed=rep)
        for name, value in truth.items():
            hits[name] += ci[name][1] <= value <= ci[name][2]
    for name, h in hits.items():
        # binomial sd of the coverage over 200 repeats is ~0.015; percentile CIs run slightly narrow
        assert 0.89 <= h / repeats <= 0.99, (name, h / repeats)


def test_flops_of_conv_and_linear_by_hand() -> None:
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    # 9x11 input -> 5x6 output; each output element is 3*3*3 multiply-adds = 2*27 FLOPs.
    assert forward_flops(conv, (9, 11)) == 2 * (5 * 5 * 6) * (3 * 3 * 3)
    head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 4))
    assert forward_flops(head, (2, 2)) == 2 * 12 * 4
    grey = nn.Conv2d(1, 2, 1, bias=False)
    assert forward_flops(grey, (4, 4), in_chans=1) == 2 * 2 * 16


def test_resnet18_flops_are_twice_torchvision_macs() -> None:
    model = build_model("resnet18", 1000)
    flops = forward_flops(model, (224, 224))
    assert gmacs(flops) == pytest.approx(1.814, abs=1e-3)  # torchvision's "GFLOPS" figure (multiply-adds)
    assert gflops(flops) == pytest.approx(3.628, abs=1e-3)
    assert next(model.parameters()).device.type == "cpu" and model.training  # model left untouched


@pytest.mark.parametrize("stem", ["standard", "lowres"])
def test_flops_scale_with_area(stem: str) -> None:
    """Halving the magnification quarters the pixels, so FLOPs drop ~4x per step (4^k over k steps)."""
    model = build_model("resnet10", 3, width=16, groups=8, stem=stem)
    sizes = [256, 128, 64, 32]  # 10x, 5x, 2.5x, 1.25x of one tissue
    flops = [forward_flops(model, (s, s)) for s in sizes]
    for k in range(1, len(sizes)):
        assert flops[0] / flops[k] == pytest.approx(4**k, rel=0.03 * k)
    odd = forward_flops(model, (250, 130)) / forward_flops(model, (125, 65))
    assert odd == pytest.approx(4, rel=0.1)  # odd sizes: strided padding rounds up, close to 4


def test_paired_bootstrap_equals_a_direct_per_resample_computation():
    from hpcdistill.scoring.metrics import paired_bootstrap

    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 300)
    a = np.where(rng.random(300) < 0.8, y, rng.integers(0, 3, 300))
    b = np.where(rng.random(300) < 0.7, y, rng.integers(0, 3, 300))
    got = paired_bootstrap(y, a, b, 3, iterations=400, level=0.9, seed=5)
    diffs = {m: [] for m in METRICS}
    for block in bootstrap_indices(300, 400, 5):  # the same index sets, replayed: one resample at a time
        for idx in block:
            ma, mb = classification_metrics(y[idx], a[idx], 3), classification_metrics(y[idx], b[idx], 3)
            for m in METRICS:
                diffs[m].append(ma[m] - mb[m])
    full_a, full_b = classification_metrics(y, a, 3), classification_metrics(y, b, 3)
    for m in METRICS:
        point, low, high, p_value = got[m]
        assert point == pytest.approx(full_a[m] - full_b[m], abs=1e-12)
        assert (low, high) == pytest.approx(tuple(np.percentile(diffs[m], [5, 95])), abs=1e-12)
        assert p_value == pytest.approx(np.mean(np.asarray(diffs[m]) <= 0), abs=1e-12)


def test_paired_ci_is_tighter_than_marginal_cis_on_correlated_predictions():
    """Two methods that agree on most samples: their marginal CIs overlap widely, the paired CI of the difference
    is narrow and excludes 0."""
    from hpcdistill.scoring.metrics import paired_bootstrap

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 400)
    b = np.where(rng.random(400) < 0.75, y, (y + 1) % 3)  # 75% right
    a = b.copy()
    fix = np.flatnonzero(b != y)[:24]  # a = b, plus 24 of b's errors corrected (+6 points)
    a[fix] = y[fix]
    marginal_a = bootstrap_ci(y, a, 3, iterations=2000, seed=0)["accuracy"]
    marginal_b = bootstrap_ci(y, b, 3, iterations=2000, seed=0)["accuracy"]
    point, low, high, p_value = paired_bootstrap(y, a, b, 3, iterations=2000, seed=0)["accuracy"]
    assert marginal_a[1] < marginal_b[2]  # the marginal intervals overlap: they would call it "not significant"
    assert 0 < low and high - low < 0.75 * min(marginal_a[2] - marginal_a[1], marginal_b[2] - marginal_b[1])
    assert point > 0 and p_value == 0.0
