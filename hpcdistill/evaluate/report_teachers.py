"""The report's view of each teacher next to the students it taught: its validation accuracy (at the export's pick,
what the teacher gate judged) and test accuracy beside each student's, per training seed; and the sentence the
ordering check adds when a broken ordering comes from a teacher that did not learn."""

from __future__ import annotations

from typing import Any

from hpcdistill.common.mags import mag_name
from hpcdistill.scoring.method_labels import BASELINE, TEACHER, method_order


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def teachers_table(results: list[Any]) -> str:
    """One row per teacher seed: the teacher's validation and test accuracy, then each student's test accuracy."""
    teachers = sorted((r for r in results if r.method == TEACHER), key=lambda r: (r.seed is None, r.seed))
    if not teachers:
        return "_No teacher evaluation found._"
    students = sorted(
        {(r.mag, r.method) for r in results if r.method != TEACHER}, key=lambda k: (-k[0], method_order(k[1]))
    )
    header = ["Seed", "Teacher val", "Teacher test", *(f"{m} {mag_name(mag)} test" for mag, m in students)]
    rows = []
    for t in teachers:
        scored = {(r.mag, r.method): r.metrics["accuracy"][0] for r in results if r.seed == t.seed}
        cells = [_pct(scored.get(k)) for k in students]
        rows.append(
            [str(t.seed) if t.seed is not None else "-", _pct(t.val_accuracy), _pct(t.metrics["accuracy"][0])] + cells
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    note = (
        "Accuracy in %, macro one-vs-rest; the teacher's validation accuracy is its export's, at the pick the "
        "teacher gate judged before distillation."
    )
    return note + "\n\n" + "\n".join(lines)


def teacher_blame(results: list[Any], mag: float) -> str:
    """' Teacher s1 (val 62.0%, test 63.8%) is below its baseline at 2.5x ...' for every seed whose teacher tested
    no better than that seed's baseline at `mag`; '' when every teacher beat its baseline."""
    failed = []
    for t in (r for r in results if r.method == TEACHER):
        base = next((r for r in results if r.method == BASELINE and r.mag == mag and r.seed == t.seed), None)
        if base is not None and t.metrics["accuracy"][0] <= base.metrics["accuracy"][0]:
            seed = "" if t.seed is None else f" s{t.seed}"
            failed.append(
                f"teacher{seed} (val {_pct(t.val_accuracy)}%, test {_pct(t.metrics['accuracy'][0])}%) is no better "
                f"than its baseline ({_pct(base.metrics['accuracy'][0])}%)"
            )
    if not failed:
        return ""
    return (
        f" The ordering fails because the teacher failed: {'; '.join(failed)}; a student cannot learn from it "
        "what it does not know (retrain the teacher; the teacher gate refuses such a teacher by default)."
    )
