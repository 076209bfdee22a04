"""What a set of calls says before any metric does: a model that called (nearly) every unit one class, and a cohort
too small for its scores to mean much. One line each, said wherever predictions are scored (training's validation,
`evaluate`, `predict --labels`) or made (`predict`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COLLAPSE_SHARE = 0.9  # a model that calls at least this share of the units one class, where several are expected
COLLAPSE_MIN_UNITS = 5  # fewer units than this cannot tell a collapse from chance
SMALL_UNITS = 20  # fewer scored units than this in all, or
SMALL_PER_CLASS = 5  # fewer than this of a class the labels hold: said, and marked in the report


def call_share(calls: Sequence[int], num_classes: int) -> tuple[int, float]:
    """(the most frequent call, the share of units that got it)."""
    counts = np.bincount(np.asarray(calls, dtype=np.int64), minlength=num_classes)
    top = int(counts.argmax())
    return top, float(counts[top] / max(1, len(calls)))


def collapse_line(
    calls: Sequence[int], classes: Sequence[str], unit: str, labels: Sequence[int] | None = None
) -> str | None:
    """One line when the calls are (nearly) all one class while the labels (or, without labels, the classes the
    model was trained on) hold several; None otherwise."""
    n, k = len(calls), len(classes)
    if n < COLLAPSE_MIN_UNITS or k < 2:
        return None
    top, share = call_share(calls, k)
    if share < COLLAPSE_SHARE:
        return None
    count = round(share * n)
    if labels is None:
        return (
            f"the model called {count} of {n} {unit}s {classes[top]!r} though it was trained on {k} classes: it may "
            "have learned nothing (score it on labelled slides: predict --labels)"
        )
    held = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)
    present = int((held > 0).sum())
    if present < 2 or held.max() >= COLLAPSE_SHARE * n:  # the cohort itself is (nearly) one class
        return None
    calls_a, labels_a = np.asarray(calls), np.asarray(labels)
    balanced = float(np.mean([np.mean(calls_a[labels_a == c] == c) for c in range(k) if held[c]]))
    return (
        f"the model called {count} of {n} {unit}s {classes[top]!r} while the labels hold {present} classes: it has "
        f"collapsed onto one class (balanced accuracy {balanced:.2f}, chance {1 / present:.2f})"
    )


def small_count_line(labels: Sequence[int], classes: Sequence[str], unit: str) -> str | None:
    """One line when the scored units are fewer than SMALL_UNITS, or a class the labels hold has fewer than
    SMALL_PER_CLASS of them; None otherwise."""
    n = len(labels)
    held = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    thin = [f"{classes[c]} {int(held[c])}" for c in range(len(classes)) if 0 < held[c] < SMALL_PER_CLASS]
    if n >= SMALL_UNITS and not thin:
        return None
    parts = ([f"only {n} {unit}s (under {SMALL_UNITS})"] if n < SMALL_UNITS else []) + (
        [f"under {SMALL_PER_CLASS} {unit}s of {', '.join(thin)}"] if thin else []
    )
    return (
        f"a small cohort: {'; '.join(parts)}: one {unit} moves a score by {100 / max(1, n):.0f} points and the CIs "
        "are wide; read these as a first look, not a result"
    )
