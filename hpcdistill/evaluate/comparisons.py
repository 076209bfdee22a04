"""Paired comparisons between methods scored on the same test tissues: each KD method against the baseline, and KD
with auxiliary sets against plain KD, per magnification. Both methods are resampled with the same index sets (the
same tissues, checked by their sample keys; whole slides when the evaluation resampled slides), so the CI is that of
the difference itself, much tighter than two marginal CIs. With several training seeds, each seed's paired
resampled differences are concatenated (a seed-pooled bootstrap) and the point is the mean over seeds."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcdistill.common.errors import EvaluationError
from hpcdistill.scoring.method_labels import AUX_PREFIX, BASELINE, KD, TEACHER
from hpcdistill.scoring.metrics import METRICS, difference_ci, paired_differences


@dataclass(frozen=True)
class Comparison:
    mag: float
    a: str  # method
    b: str  # the method it is compared with
    seeds: int
    metrics: dict[str, tuple[float, float, float, float]]  # metric -> (a - b, low, high, P(a - b <= 0))

    @property
    def significant(self) -> bool:
        """The paired CI of the accuracy difference excludes 0."""
        _, low, high, _ = self.metrics["accuracy"]
        return low > 0 or high < 0


def read_predictions(result: Any) -> dict[str, tuple[int, int, str]]:
    """{sample key: (label id, predicted id, slide)} from an evaluation's predictions CSV: one row per tissue
    (keyed by sample key), or per slide or patient (keyed by its id, the first column)."""
    path = Path(result.predictions)
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows, key = list(reader), "key" if "key" in (reader.fieldnames or []) else (reader.fieldnames or ["key"])[0]
        classes = list(result.classes)
        return {
            r[key]: (classes.index(r["label"]), classes.index(r["pred"]), r.get("slide", r[key]))
            for r in rows
            if r["label"]
        }
    except (OSError, KeyError, ValueError) as err:
        raise EvaluationError(f"{path}: cannot read the predictions of {result.source} ({err})") from None


def pair(a: Any, b: Any) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """a - b on the samples both scored, resampled alike; refuses runs scored on different samples or labels."""
    pa, pb = read_predictions(a), read_predictions(b)
    if pa.keys() != pb.keys() or a.classes != b.classes or a.kappa_weights != b.kappa_weights:
        raise EvaluationError(
            f"{a.source} and {b.source}: not scored on the same samples and classes; a paired "
            "comparison needs both evaluated on one split of one shard set"
        )
    keys = sorted(pa)
    if any(pa[k][0] != pb[k][0] for k in keys):
        raise EvaluationError(f"{a.source} and {b.source}: the same samples carry different labels")
    groups = [pa[k][2] for k in keys] if a.resample == "slides" else None
    return paired_differences(
        [pa[k][0] for k in keys],
        [pa[k][1] for k in keys],
        [pb[k][1] for k in keys],
        len(a.classes),
        iterations=a.ci[1],
        seed=0,
        groups=groups,
        kappa_weights=a.kappa_weights,
    )


def compare(a_runs: dict[Any, Any], b_runs: dict[Any, Any], mag: float, level: float) -> Comparison | None:
    """a against b over the seeds both have (None when they share none)."""
    seeds = sorted(set(a_runs) & set(b_runs), key=str)
    if not seeds:
        return None
    points, resampled = [], []
    for seed in seeds:
        point, diffs = pair(a_runs[seed], b_runs[seed])
        points.append(point)
        resampled.append(diffs)
    first = a_runs[seeds[0]]
    metrics = {
        m: difference_ci(float(np.mean([p[m] for p in points])), np.concatenate([r[m] for r in resampled]), level)
        for m in METRICS
    }
    return Comparison(mag, first.method, b_runs[seeds[0]].method, len(seeds), metrics)


def paired_comparisons(results: list[Any]) -> list[Comparison]:
    """Per magnification: every KD method against the baseline, every KD (aux) against KD."""
    runs: dict[tuple[str, float], dict[Any, Any]] = {}
    for r in results:
        if r.study == "main" and r.method != TEACHER:
            runs.setdefault((r.method, r.mag), {})[r.seed] = r
    out = []
    for mag in sorted({mag for _, mag in runs}):
        methods = {m for m, g in runs if g == mag}
        pairs = [(m, BASELINE) for m in sorted(methods) if m.startswith(KD)]
        pairs += [(m, KD) for m in sorted(methods) if m.startswith(AUX_PREFIX)]
        for a, b in pairs:
            if (b, mag) in runs and (found := compare(runs[(a, mag)], runs[(b, mag)], mag, 0.95)) is not None:
                out.append(found)
    return out


def format_difference(value: tuple[float, float, float, float]) -> str:
    point, low, high, _ = value
    return f"{100 * point:+.2f} ({100 * low:+.2f} to {100 * high:+.2f})"
