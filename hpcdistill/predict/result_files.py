"""What a prediction writes beside its per-slide outputs: tissues.csv, slides.csv (with each slide's label, whether
its call is right and whether the model saw it, when a labels CSV is given) and predictions.json; without labels,
the line that says the slide calls have collapsed onto one class (with labels the cohort's scores say it)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable

from hpcdistill.common.console import say
from hpcdistill.common.errors import PredictionError
from hpcdistill.common.files import atomic_output, atomic_write_json
from hpcdistill.scoring.cohort_checks import collapse_line


def write_predictions(
    out: Path, summary: dict[str, Any], results: list[dict], cohort: tuple[dict, dict] | None = None
) -> dict[str, Any]:
    """tissues.csv, slides.csv and predictions.json for `results` (one per slide, in slide order). With a labels
    CSV's `cohort` (cohort_scores.cohort_labels: {slide: class index}, {slide: patient}), slides.csv says each
    slide's label, whether its call is correct and whether the model saw it in training. What it says is kept in
    predictions.json's `notes` too (an array's merge runs as a job: the command repeats them from there)."""
    classes = summary["classes"]
    calls = [classes.index(r["call"]) for r in results if r["status"] == "ok"]
    notes = []
    if cohort is None and (line := collapse_line(calls, classes, "slide")):
        notes.append(f"{out}: {line}")
        say(notes[-1])
    judged = _judged(results, classes, cohort, summary.get("model_seen") or {}) if cohort is not None else {}
    with atomic_output(out / "tissues.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "tissue", "x", "y", "w", "h", "pred"] + [f"p_{c}" for c in classes])
        for r in results:
            for t in r.get("tissues", []):
                writer.writerow([r["slide"], t["tissue"], *t["box_l0"], t["pred"], *(f"{p:.6f}" for p in t["probs"])])
    with atomic_output(out / "slides.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        head = ["slide", "path", "status", "call", "rule", "read", "level", "level_mag", "base_mag", "mpp"]
        head += ["mag_source", "reason"]  # the scale each slide was read at, and where it came from
        writer.writerow(
            head + (["label", "correct", "seen"] if cohort is not None else []) + [f"p_{c}" for c in classes]
        )
        for r in results:
            probs = [f"{p:.6f}" for p in r.get("probs", [])] or [""] * len(classes)
            reason = r.get("reason") or r.get("note", "")  # a skip's reason, or a pyramid read's fallback
            marks = list(judged.get(r["slide"], ("", "", ""))) if cohort is not None else []
            writer.writerow([*(r.get(k, "") for k in head[:-1]), reason, *marks, *probs])
    summary = {**summary, "notes": notes, "slides": results}
    atomic_write_json(out / "predictions.json", summary, indent=1)
    if not any(r["status"] == "ok" for r in results):
        raise PredictionError(f"{out}: no slide could be classified (see slides.csv)")
    return summary


def own_slides(slides: Iterable[str], patients: dict[str, str], seen: dict[str, Any] | None) -> set[str]:
    """The slides among `slides` the model trained, validated or distilled on, by slide id or by patient id (its
    export's record, `seen`: {"slides", "patients"}); none when the export records none."""
    by_slide, by_patient = set((seen or {}).get("slides", ())), set((seen or {}).get("patients", ()))
    return {s for s in slides if s in by_slide or patients.get(s) in by_patient}


def _judged(
    results: list[dict], classes: list[str], cohort: tuple[dict, dict], seen: dict[str, Any]
) -> dict[str, tuple[str, str, str]]:
    """{slide: (label, correct yes/no, seen yes/no)} for the labelled slides (skipped slides: no call to judge)."""
    labels, patients = cohort
    own = own_slides(labels, patients, seen)
    calls = {r["slide"]: r.get("call") for r in results if r["status"] == "ok"}
    yes_no = lambda flag: "yes" if flag else "no"  # noqa: E731
    return {
        slide: (
            classes[y],
            yes_no(calls[slide] == classes[y]) if slide in calls else "",
            yes_no(slide in own) if seen else "",
        )
        for slide, y in labels.items()
    }
