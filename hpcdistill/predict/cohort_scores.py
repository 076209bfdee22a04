"""`predict --labels`: a lab validating a model on its own labelled slides. The slide calls (and, where the labels
CSV names patients, the patient calls) are scored against the CSV's labels with the same rule, metrics and
bootstrap CIs as `evaluate --unit slide|patient`, and written to `scores.json` beside `slides.csv`. Slides and
patients the model trained, validated or distilled on (its export's record) are left out of the scores and said in
one line, unless `--include-seen`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcdistill.common.console import say
from hpcdistill.common.errors import PredictionError
from hpcdistill.common.files import atomic_write_json
from hpcdistill.predict.result_files import own_slides
from hpcdistill.scoring.aggregation import unit_rows
from hpcdistill.scoring.metrics import METRIC_TITLES, METRICS
from hpcdistill.scoring.unit_scores import say_unit_notes, score_unit
from hpcdistill.slides.catalog import read_labels_csv

SCORES = "scores.json"


def window_rows(results: list[dict[str, Any]], labels: dict[str, int]) -> list[dict[str, Any]]:
    """Every window of every classified, labelled slide, as evaluation's rows (slide id, tissue, area, y)."""
    rows = []
    for r in results:
        if r["status"] != "ok" or r["slide"] not in labels:
            continue
        for w in r["windows"]:
            area = float(w["box_l0"][2]) * float(w["box_l0"][3])
            rows.append(
                {
                    "key": f"{r['slide']} {w['tissue']} {w['window']}",
                    "slide": r["slide"],
                    "tissue": w["tissue"],
                    "area": area,
                    "probs": w["probs"],
                    "y": labels[r["slide"]],
                }
            )
    return rows


def cohort_labels(labels_csv: str | Path, results: list[dict[str, Any]], classes: list[str]) -> tuple[dict, dict]:
    """({slide id: class index}, {slide id: patient}) for the predicted slides the CSV labels; one line for a label
    the model does not know."""
    rows = read_labels_csv(labels_csv, [Path(r["path"]) for r in results], other_slides=True)
    labels, patients = {}, {}
    for row in rows.values():
        if not row.label:
            continue
        if row.label not in classes:
            raise PredictionError(
                f"{labels_csv}:{row.line}: label {row.label!r} is not a class of the model ({', '.join(classes)})"
            )
        labels[row.slide], patients[row.slide] = classes.index(row.label), row.patient
    return labels, patients


def leave_out_seen(
    labels: dict[str, int], patients: dict[str, str], seen: dict[str, Any] | None, include: bool, where: str
) -> list[str]:
    """The labelled slides the model trained, validated or distilled on (by slide, or by patient id), said in one
    line; unless `include`, taken out of `labels` (scored slides only). [] when the export records none."""
    own = sorted(own_slides(labels, patients, seen))
    if own:
        fate = (
            "scored with the rest (--include-seen)" if include else "left out of the scores (--include-seen keeps them)"
        )
        say(
            f"{where}: {len(own)} of {len(labels)} labelled slides are the model's own (it trained, validated or "
            f"distilled on them, or on their patients): {fate}"
        )
        for slide in own if not include else ():
            del labels[slide]
    return own


def score_prediction(
    out: Path, results: list[dict[str, Any]], summary: dict[str, Any], options: Any, cohort: tuple[dict, dict]
) -> dict[str, Any]:
    """score_cohort for a prediction, in one process or at an array's merge: the classes, the model's own slides
    and the kappa weights from its `summary` (predictions.json's head), the labels and rules from its `options`."""
    return score_cohort(
        out,
        results,
        summary["classes"],
        options.labels,
        options.slide_rule,
        cohort=cohort,
        seen=summary.get("model_seen"),
        include_seen=options.include_seen,
        kappa_weights=summary.get("kappa_weights", "unweighted"),
    )


def score_cohort(
    out: Path,
    results: list[dict[str, Any]],
    classes: list[str],
    labels_csv: str | Path,
    rule: str,
    iterations: int = 10000,
    *,
    cohort: tuple[dict, dict],
    seen: dict[str, Any] | None = None,
    include_seen: bool = False,
    kappa_weights: str = "unweighted",
) -> dict[str, Any]:
    """Score the slide (and patient) calls; writes and returns scores.json's content. `cohort`: `cohort_labels` of
    `labels_csv` (read once per prediction); `seen`: the export's record of its own slides and patients;
    `kappa_weights`: scoring.metrics.kappa_weights_of the export's config."""
    labels, patients = dict(cohort[0]), cohort[1]  # a copy: the model's own slides are taken out of it
    own = leave_out_seen(labels, patients, seen, include_seen, str(labels_csv))
    rows = window_rows(results, labels)
    if not rows:
        raise PredictionError(
            f"{labels_csv}: labels none of the classified slides"
            + (" the model has not seen (--include-seen scores its own)" if own else "")
            + "; nothing to score"
        )
    units = ["slide"] + (["patient"] if len(set(patients.values())) < len(patients) else [])
    scored = {}
    for unit in units:
        unit_table = unit_rows(rows, unit, rule, patients.get)
        scored[unit] = score_unit(
            unit_table, classes, iterations=iterations, level=0.95, seed=0, unit=unit, kappa_weights=kappa_weights
        )
        say_unit_notes(unit, scored[unit], str(labels_csv))
    unscored = sorted(r["slide"] for r in results if r["slide"] not in labels)
    record = {
        "labels": str(labels_csv),
        "slide_rule": rule,
        "classes": classes,
        "kappa_weights": kappa_weights,
        "units": scored,
        "unscored_slides": unscored,
        "seen_slides": own,  # the model's own: left out unless include_seen
        "include_seen": include_seen,
        "bootstrap": {"iterations": iterations, "level": 0.95, "seed": 0},
    }
    atomic_write_json(out / SCORES, record, indent=1)
    say_scores(out / SCORES, scored)
    return record


def say_scores(path: Path, scored: dict[str, Any]) -> None:
    """One line per unit: its point estimates (the CIs are in `path`)."""
    for unit, s in scored.items():
        metrics = (m for m in (*METRICS, "auroc") if s["metrics"][m])
        cells = ", ".join(f"{METRIC_TITLES[m]} {100 * s['metrics'][m][0]:.1f}" for m in metrics)
        say(f"{unit} level, {s['n']} {unit}s: {cells} (CIs in {path})")
