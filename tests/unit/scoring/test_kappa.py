"""Cohen's kappa equals scikit-learn's, unweighted and quadratic, point and batched; undefined kappa is 0."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.scoring.metrics import (
    bootstrap_ci,
    classification_metrics,
    confusion_matrix,
    kappa_from_confusions,
    kappa_weights_of,
)


@pytest.mark.parametrize("weights, sklearn_weights", [("unweighted", None), ("quadratic", "quadratic")])
@pytest.mark.parametrize("seed", range(5))
def test_kappa_equals_scikit_learns(weights: str, sklearn_weights: str | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    y_true = rng.integers(0, k, 70)
    y_pred = np.where(rng.random(70) < 0.5, y_true, rng.integers(0, k, 70))
    y_true[:k], y_pred[:k] = np.arange(k), np.arange(k)  # every class present: sklearn's labels are all K
    got = classification_metrics(y_true, y_pred, k, kappa_weights=weights)["kappa"]
    assert got == pytest.approx(cohen_kappa_score(y_true, y_pred, weights=sklearn_weights), abs=1e-12)


def test_quadratic_kappa_charges_far_errors_more() -> None:
    y_true = [0, 1, 2] * 10
    near = [min(y + 1, 2) if i % 3 == 0 else y for i, y in enumerate(y_true)]  # a grade off
    far = [2 - y if i % 3 == 0 else y for i, y in enumerate(y_true)]  # normal called celiac and back
    q = lambda pred: classification_metrics(y_true, pred, 3, kappa_weights="quadratic")["kappa"]  # noqa: E731
    u = lambda pred: classification_metrics(y_true, pred, 3)["kappa"]  # noqa: E731
    assert q(far) < q(near)
    assert q(near) == pytest.approx(cohen_kappa_score(y_true, near, weights="quadratic"))
    assert u(far) == pytest.approx(cohen_kappa_score(y_true, far))


def test_batched_kappa_matches_each_matrix_and_undefined_is_zero() -> None:
    rng = np.random.default_rng(3)
    mats = [confusion_matrix(rng.integers(0, 3, 40), rng.integers(0, 3, 40), 3) for _ in range(4)]
    mats.append(np.diag([5, 0, 0]))  # labels and calls all one class: chance agreement is total
    batched = kappa_from_confusions(np.stack(mats), "quadratic")
    for conf, value in zip(mats[:4], batched[:4]):
        t, p = np.nonzero(conf)
        y_true, y_pred = np.repeat(t, conf[t, p]), np.repeat(p, conf[t, p])
        assert value == pytest.approx(cohen_kappa_score(y_true, y_pred, weights="quadratic"), abs=1e-12)
    assert batched[4] == 0.0


def test_kappa_ci_and_config_weights() -> None:
    y_true = np.repeat([0, 1, 2], 20)
    y_pred = y_true.copy()
    y_pred[::4] = 0
    point, low, high = bootstrap_ci(y_true, y_pred, 3, iterations=500, kappa_weights="quadratic")["kappa"]
    assert low <= point <= high and point == pytest.approx(cohen_kappa_score(y_true, y_pred, weights="quadratic"))
    assert kappa_weights_of({"data": {"ordinal_classes": ["normal", "duodenitis", "celiac"]}}) == "quadratic"
    assert kappa_weights_of({"data": {"ordinal_classes": []}}) == kappa_weights_of({}) == "unweighted"
    with pytest.raises(HpcdistillError, match="kappa weights"):
        classification_metrics(y_true, y_pred, 3, kappa_weights="linear")
