"""Does the paper's ordering hold? Teacher >= KD (aux) >= KD > baseline per magnification, judged link by link from
the paired (or marginal) CIs, so a verdict is never drawn from point estimates the statistics cannot tell apart;
and the seed means it reads (one result per method, magnification and study)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hpcdistill.common.mags import mag_name
from hpcdistill.evaluate.comparisons import Comparison
from hpcdistill.evaluate.report_teachers import teacher_blame
from hpcdistill.scoring.method_labels import AUX_PREFIX, BASELINE, KD, TEACHER
from hpcdistill.scoring.metrics import METRICS


def by_run(results: list[Any]) -> dict[tuple[str, float, str], list[Any]]:
    groups: dict[tuple[str, float, str], list[Any]] = {}
    for r in results:
        groups.setdefault((r.method, r.mag, r.study), []).append(r)
    return groups


def seed_means(results: list[Any]) -> list[Any]:
    """One result per method, magnification and study: with several seeds, each metric's point and bounds are
    their means over the seeds (the ordering check reads these; significance comes from the pooled paired CIs)."""
    out = []
    for runs in by_run(results).values():
        metrics = {m: tuple(float(np.mean([r.metrics[m][i] for r in runs])) for i in range(3)) for m in METRICS}
        out.append(dataclasses.replace(runs[0], metrics=metrics))
    return out


def ordering_check(results: list[Any], comparisons: list[Comparison] | None = None) -> list[str]:
    """Per low magnification, does the paper's ordering teacher >= KD(aux) >= KD > baseline hold on its OvR accuracy?

    Judged link by link from what the statistics resolve, never from point estimates alone: a link with a paired
    comparison (`comparisons`: KD vs baseline, KD (aux) vs KD) holds when the paired CI of the difference lies above
    0, is contradicted when it lies below, and is not resolved when it crosses 0; a link without one (the teacher)
    is judged the same way from the two marginal CIs (apart or overlapping). The ordering "holds" when every link
    holds, is "contradicted" when any link is, and is otherwise "not resolved". KD(aux) is the best of the
    auxiliary-set variants.
    """
    per_seed, results = results, seed_means(results)
    teacher = next((r for r in results if r.method == TEACHER), None)
    lines = []
    for mag in sorted({r.mag for r in results if r.method == BASELINE}):
        at = {r.method: r for r in results if r.mag == mag and r.study == "main"}
        if BASELINE not in at or KD not in at:
            continue
        aux = [r for m, r in at.items() if m.startswith(AUX_PREFIX)]
        chain = ([teacher] if teacher else []) + ([max(aux, key=lambda r: r.metrics["accuracy"][0])] if aux else [])
        chain += [at[KD], at[BASELINE]]
        links = [_link(a, b, mag, comparisons) for a, b in zip(chain, chain[1:])]
        states = {state for state, _ in links}
        verdict = "contradicted" if "contradicted" in states else "holds" if states == {"holds"} else "not resolved"
        numbers = ", ".join(f"{r.method} {100 * r.metrics['accuracy'][0]:.1f}%" for r in chain)
        out_of_order = any(b.metrics["accuracy"][0] > a.metrics["accuracy"][0] for a, b in zip(chain, chain[1:]))
        lines.append(
            f"- {mag_name(mag)}: the paper's ordering {verdict} (OvR accuracy (paper): {numbers}; "
            + "; ".join(text for _, text in links)
            + "). "
            + _best_kd_line(chain, at[BASELINE], mag, comparisons)
            + (teacher_blame(per_seed, mag) if out_of_order or verdict == "contradicted" else "")
        )
    return lines


def _link(a: Any, b: Any, mag: float, comparisons: list[Comparison] | None) -> tuple[str, str]:
    """(holds / contradicted / not resolved, the words) for "a >= b" (for the baseline: a > b)."""
    paired = next((c for c in comparisons or [] if c.mag == mag and c.a == a.method and c.b == b.method), None)
    sign = ">" if b.method == BASELINE else ">="
    if paired is not None:
        _, low, high, _ = paired.metrics["accuracy"]
        how = f"paired 95% CI {100 * low:+.1f} to {100 * high:+.1f}"
    else:
        (_, a_low, a_high), (_, b_low, b_high) = a.metrics["accuracy"], b.metrics["accuracy"]
        low, high = a_low - b_high, a_high - b_low  # the CIs apart (low > 0 or high < 0) or overlapping
        how = "CIs " + ("apart" if low > 0 or high < 0 else "overlap")
    state = "holds" if low > 0 else "contradicted" if high < 0 else "not resolved"
    return state, f"{a.method} {sign} {b.method}: {state} ({how})"


def _best_kd_line(chain: list[Any], base: Any, mag: float, comparisons: list[Comparison] | None) -> str:
    best_kd = max((r for r in chain if r.method.startswith(KD)), key=lambda r: r.metrics["accuracy"][0])
    paired = next((c for c in comparisons or [] if c.mag == mag and c.a == best_kd.method and c.b == BASELINE), None)
    gain = 100 * (best_kd.metrics["accuracy"][0] - base.metrics["accuracy"][0])
    if paired is None:
        return f"Best KD vs baseline: {gain:+.1f} points (no paired comparison)."
    point, low, high, p_value = paired.metrics["accuracy"]
    return (
        f"Best KD vs baseline: {gain:+.1f} points, paired 95% CI {100 * low:+.1f} to {100 * high:+.1f}, "
        f"P(gain <= 0) = {p_value:.3f}: " + ("significant" if paired.significant else "not significant") + "."
    )
