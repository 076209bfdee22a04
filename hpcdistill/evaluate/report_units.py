"""The report's sections at the units a pathologist signs out: the Table 4 layout at the slide (or patient) level
with AUROC, per-class rows and the confusion matrix of each method, one line for each class a scored split lacks,
and one for each model that collapsed onto one class or cohort too small to read as a result. They read the `units`
an evaluation recorded (`evaluate --unit`)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from hpcdistill.common.mags import mag_name
from hpcdistill.scoring.method_labels import method_order
from hpcdistill.scoring.metrics import METRICS

UNIT_METRICS = (*METRICS, "auroc")


def at_unit(results: list, unit: str) -> list:
    """The results as scored at `unit`, those that recorded it: that unit's metrics, and its predictions CSV, whose
    rows are the units (a paired comparison then resamples slides or patients)."""
    return [
        dataclasses.replace(
            r,
            metrics=r.units[unit]["metrics"],
            resample="samples",
            predictions=r.predictions.replace("_predictions.csv", f"_{unit}_predictions.csv"),
        )
        for r in results
        if unit in r.units
    ]


def unit_section(results: list, unit: str, table: Callable, plot: Callable, paired: Callable) -> list[str]:
    """Table 4 layout at `unit`, AUROC included, its paired differences (resampling that unit) and its
    accuracy-vs-GFLOPs figure; [] when no run recorded it."""
    scored = at_unit(results, unit)
    if not scored:
        return []
    n = {r.units[unit]["n"] for r in results if unit in r.units}
    rule = "; slides and patients are called by the rule `evaluate --slide-rule` names in each record"
    small = sorted({r.units[unit]["small"] for r in results if unit in r.units and r.units[unit].get("small")})
    figure = plot(scored, f"figure3-{unit}.png", f"{unit.capitalize()}-level accuracy vs compute")
    return [
        f"## {unit.capitalize()} level (Table 4 layout, AUROC included)",
        f"{'/'.join(map(str, sorted(n)))} {unit}s scored; CIs resample {unit}s{rule if unit != 'tissue' else ''}."
        + "".join(f" **Small cohort** ({line})." for line in small),
        table(scored, metrics=UNIT_METRICS),
        f"Paired differences at the {unit} level (the same {unit}s resampled for both methods):",
        paired(scored),
        f"![{unit}-level accuracy vs GFLOPs]({figure})",
    ]


def class_section(results: list, unit: str) -> list[str]:
    """Per method and magnification (the lowest seed): per-class support, precision, recall, F1 and AUROC, and the
    confusion matrix (rows true, columns predicted) at `unit`."""
    scored = sorted((r for r in results if unit in r.units), key=lambda r: (r.mag, method_order(r.method), r.seed or 0))
    seen, blocks = set(), [f"## Per class and confusion matrices ({unit} level)"]
    for r in scored:
        if (r.method, r.mag) in seen:
            continue
        seen.add((r.method, r.mag))
        s, classes = r.units[unit], list(r.classes)
        cells = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
        rows = [
            f"| {c} | {s['per_class']['support'][i]} | "
            + " | ".join(cells(s["per_class"][m][i]) for m in ("precision", "recall", "f1", "auroc"))
            + " | "
            + " | ".join(str(v) for v in s["confusion"][i])
            + " |"
            for i, c in enumerate(classes)
        ]
        head = "| class | n | precision | recall | F1 | AUROC | " + " | ".join(f"→ {c}" for c in classes) + " |"
        blocks += [f"**{r.method} @ {mag_name(r.mag)}**", "\n".join([head, "|---" * (6 + len(classes)) + "|", *rows])]
    return blocks if len(blocks) > 1 else []


def warning_lines(results: list) -> list[str]:
    """One line per run and unit whose calls collapsed onto one class, or whose cohort is small (the lines the
    evaluation said, kept in its record)."""
    lines = []
    for r in sorted(results, key=lambda r: (r.mag, method_order(r.method), r.seed or 0)):
        for unit, s in r.units.items():
            lines += [
                f"- {r.method} @ {mag_name(r.mag)}, {unit} level: {s[k]}." for k in ("collapse", "small") if s.get(k)
            ]
    return lines


def absent_lines(results: list) -> list[str]:
    """One line per run and unit whose scored set lacks a class: never averaged over silently."""
    lines = []
    for r in sorted(results, key=lambda r: (r.mag, method_order(r.method), r.seed or 0)):
        for unit, s in r.units.items():
            if s.get("absent_classes"):
                lines.append(
                    f"- {r.method} @ {mag_name(r.mag)}, {unit} level: no {unit} of class "
                    f"{', '.join(s['absent_classes'])}; its recall, F1 and AUROC are n/a and left out of the macro "
                    "averages."
                )
    return lines
