"""Evaluate an exported model on a shard split: the paper's metrics with bootstrap CIs, plus GFLOPs (§4.4).

Writes `<run>/eval/<split>.json` (the record `hpcdistill report` reads) and `<run>/eval/<split>_predictions.csv`
(one row per tissue window). The magnification comes from the checkpoint, never from the command line, so a
student cannot be scored on the wrong resolution by accident.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from hpcdistill.common.console import say
from hpcdistill.common.errors import EvaluationError
from hpcdistill.common.files import atomic_output, atomic_write_json
from hpcdistill.common.folder_lock import one_writer
from hpcdistill.common.mags import mag_name
from hpcdistill.common.provenance import provenance
from hpcdistill.data.streams import StreamSpec, make_loader
from hpcdistill.evaluate.options import EvalOptions
from hpcdistill.models.export import ExportedModel, load_exported
from hpcdistill.models.inference import model_outputs, pick_device, require_finite
from hpcdistill.scoring.aggregation import unit_rows
from hpcdistill.scoring.flops import flops_at_sizes
from hpcdistill.scoring.method_labels import method_label
from hpcdistill.scoring.metrics import METRICS, bootstrap_ci, classification_metrics, kappa_weights_of
from hpcdistill.scoring.unit_scores import say_unit_notes, score_unit
from hpcdistill.shards.manifest import dataset_name, read_manifest, shard_stain, split_summary
from hpcdistill.shards.reader import resolve_sets
from hpcdistill.slides.stain import stain_mismatch


def predict_split(
    model: torch.nn.Module,
    shards: str | Path,
    manifest: dict[str, Any],
    split: str,
    mag: float,
    stats: dict[str, list[float]],
    workers: int = 0,
    checkpoint: str = "model",
    progress: bool | None = False,
) -> list[dict[str, Any]]:
    """(key, slide, label, prediction, probabilities) for every sample of the split, by sample key, on the model's
    device, standardised with `stats` (the model's own, from its training shards: another folder's would feed it
    inputs on another scale); `workers` loader processes decode the shards in parallel (whole tissues at 10x decode
    slowly). `progress`: a bar over the samples (None: on a terminal)."""
    splits = manifest.get("splits", {})
    sets = resolve_sets(shards, manifest, [split]) if split in splits else None
    if sets is None or not sets.urls or sets.samples == 0:
        raise EvaluationError(
            f"{Path(shards) / 'manifest.json'}: split {split!r} is empty or absent (splits: {split_summary(manifest)})"
        )
    if not sum(splits[split].get("class_histogram", {}).values()):
        raise EvaluationError(f"{Path(shards) / 'manifest.json'}: split {split!r} has no labeled samples to score")
    # standardised where the model runs (model_outputs), as in training
    stats = {mag_name(mag): stats}
    kinds = dict(mode="labeled", sampler="ordered", finish_on_device=True)
    spec = StreamSpec(urls=sets.urls, mag=mag, teacher_mag=mag, stats=stats, micro_batch=1, samples=-1, **kinds)
    device = next(model.parameters()).device
    loader = make_loader(spec, workers, pin_memory=device.type == "cuda")
    rows = []
    outputs = model_outputs(model, loader, device, mag=mag, remedy=f"evaluate with --device cpu (split {split!r})")
    bar = dict(
        total=sets.samples, desc=f"evaluate {split}", unit="tissue", disable=None if progress is None else not progress
    )
    for batch, _, logits in tqdm(outputs, **bar):
        require_finite(logits, checkpoint, f"{batch['key'][0]} (split {split!r})")
        probs = torch.softmax(logits.float(), dim=1)[0].cpu()
        rows.append(
            {
                "key": batch["key"][0],
                "slide": batch["slide"][0],
                "tissue": batch["tissue"][0],
                "area": batch["area"][0],
                "y": int(batch["y"][0]),
                "pred": int(probs.argmax()),
                "probs": probs.tolist(),
            }
        )
    return sorted(rows, key=lambda r: r["key"])  # workers interleave their own shards: one order for any count


def _load_for(checkpoint: str | Path, shards: str | Path, manifest: dict[str, Any]) -> ExportedModel:
    """The export, checked against the shards: same classes, and images at its magnification."""
    classes = manifest.get("classes", [])
    exported = load_exported(checkpoint, expect_classes=len(classes) or None)
    if exported.classes and classes and exported.classes != classes:
        raise EvaluationError(f"{checkpoint}: trained on classes {exported.classes}, the shards have {classes}")
    mismatch = stain_mismatch(exported.stain_norm, shard_stain(manifest), f"{Path(shards) / 'manifest.json'}")
    if mismatch:
        raise EvaluationError(f"{checkpoint}: {mismatch}")
    mags = [float(m) for m in manifest.get("mags", [])]
    if not any(math.isclose(exported.mag, m) for m in mags):
        raise EvaluationError(
            f"{Path(shards) / 'manifest.json'}: no {mag_name(exported.mag)} images "
            f"(the model's magnification); shards have {', '.join(map(mag_name, mags))}"
        )
    return exported


def _write_predictions(path: Path, rows: list[dict[str, Any]], classes: list[str]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["key", "slide", "label", "pred"] + [f"p_{c}" for c in classes])
        for r in rows:
            label = classes[r["y"]] if r["y"] >= 0 else ""
            writer.writerow([r["key"], r["slide"], label, classes[r["pred"]], *(f"{p:.6f}" for p in r["probs"])])


def evaluate_checkpoint(
    checkpoint: str | Path, shards: str | Path, options: EvalOptions = EvalOptions()
) -> dict[str, Any]:
    """Score `checkpoint` on `options.split` of the shards in `shards`; returns and writes the evaluation record.

    Each unit in `options.units` (tissue, slide, patient) is scored with CIs resampled at that unit; slides and
    patients aggregate their windows by `options.slide_rule` (scoring.aggregation, as `predict` calls slides).
    """
    o = options
    out = Path(o.out) if o.out is not None else Path(checkpoint).parent / "eval"
    with one_writer(out):  # two evaluations into one folder would interleave their files
        manifest = read_manifest(shards)
        exported = _load_for(checkpoint, shards, manifest)
        exported.model.to(pick_device(o.device))
        rows = predict_split(
            exported.model,
            shards,
            manifest,
            o.split,
            exported.mag,
            exported.stats,
            o.workers,
            str(checkpoint),
            o.progress,
        )
        labeled = _labeled(rows, shards, o.split)
        seen = seen_record(exported, labeled, manifest, where=f"{checkpoint} on {o.split}")
        kappa = kappa_weights_of(exported.config)
        bootstrap = {
            "iterations": o.iterations,
            "level": o.confidence,
            "seed": o.seed,
            "resample": "slides" if o.by_slide else "samples",
        }
        scores, by_unit = _unit_scores(
            labeled, manifest, exported.classes, o.units, o.slide_rule, bootstrap, str(checkpoint), kappa
        )
        record = _record_head(exported, shards, o.split, labeled, checkpoint, o.method, o.study, manifest) | {
            "bootstrap": bootstrap,
            **_scores(labeled, len(exported.classes), bootstrap, kappa),
            "kappa_weights": kappa,
            "slide_rule": o.slide_rule,
            "seen": seen,
            "units": scores,
            "gflops": flops_at_sizes(exported.model, manifest, exported.mag),
        }
        return _write_record(out, o.split, record, rows, exported.classes, by_unit)


def _record_head(
    exported: ExportedModel,
    shards: str | Path,
    split: str,
    labeled: list[dict],
    checkpoint: str | Path,
    method: str | None,
    study: str,
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """What was scored: the method, model, data and split."""
    return {
        "method": method or method_label(exported.config),
        "study": study,
        "dataset": dataset_name(shards, manifest),
        "seed": exported.config.get("run", {}).get("seed"),
        "mag": exported.mag,
        "split": split,
        "samples": len(labeled),
        "slides": len({r["slide"] for r in labeled}),
        "classes": exported.classes,
        "checkpoint": str(checkpoint),
        "arch": exported.arch_kwargs,
        "val": exported.val,  # validation at the export's pick: the report sets each teacher's next to its students
        "provenance": provenance(),  # how this evaluation was made
        "model_provenance": exported.provenance,  # how the model was ({}: an export older than the record)
    }


def seen_record(
    exported: ExportedModel, labeled: list[dict[str, Any]], manifest: dict[str, Any], where: str
) -> dict[str, int] | None:
    """How many scored slides and patients the model trained, validated or distilled on (its export's record; None
    for an export that has none), said in one line when any: scores on them are not a test."""
    if not exported.seen:
        return None
    slides = {r["slide"] for r in labeled}
    patient_of = {s: str((manifest.get("slides", {}).get(s) or {}).get("patient") or s) for s in slides}
    own_slides = slides & exported.seen.get("slides", set())
    own_patients = set(patient_of.values()) & exported.seen.get("patients", set())
    if own_slides or own_patients:
        say(
            f"{where}: {len(own_slides)} of {len(slides)} scored slides and {len(own_patients)} of "
            f"{len(set(patient_of.values()))} patients (matched by id) are the model's own: it trained, validated or "
            "distilled on them, so these scores are not a test"
        )
    return {"slides": len(own_slides), "patients": len(own_patients)}


def _labeled(rows: list[dict[str, Any]], shards: str | Path, split: str) -> list[dict[str, Any]]:
    labeled = [r for r in rows if r["y"] >= 0]
    if not labeled:
        raise EvaluationError(f"{Path(shards) / 'manifest.json'}: split {split!r} has no labeled samples to score")
    return labeled


def _write_record(
    out: Path,
    split: str,
    record: dict[str, Any],
    rows: list[dict[str, Any]],
    classes: list[str],
    by_unit: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{split}.json", record, indent=1)
    _write_predictions(out / f"{split}_predictions.csv", rows, classes)
    for unit, unit_table in by_unit.items():
        if unit != "tissue":  # the tissue rows are the predictions CSV above
            write_unit_predictions(out / f"{split}_{unit}_predictions.csv", unit, unit_table, classes)
    record["path"] = str(out / f"{split}.json")
    return record


def _scores(labeled: list[dict[str, Any]], k: int, bootstrap: dict[str, Any], kappa: str) -> dict[str, Any]:
    """The paper's metrics with bootstrap CIs, per-class values (NaN for an absent class becomes null) and the
    confusion matrix."""
    y_true, y_pred = [r["y"] for r in labeled], [r["pred"] for r in labeled]
    point = classification_metrics(y_true, y_pred, k, kappa)
    groups = [r["slide"] for r in labeled] if bootstrap["resample"] == "slides" else None
    ci = bootstrap_ci(
        y_true,
        y_pred,
        k,
        iterations=bootstrap["iterations"],
        level=bootstrap["level"],
        seed=bootstrap["seed"],
        groups=groups,
        kappa_weights=kappa,
    )
    return {
        "metrics": {m: list(ci[m]) for m in METRICS},
        "per_class": {m: [None if v != v else v for v in vals] for m, vals in point["per_class"].items()},
        "confusion": point["confusion"],
    }


def _unit_scores(
    labeled: list[dict[str, Any]],
    manifest: dict[str, Any],
    classes: list[str],
    units: Sequence[str],
    rule: str,
    bootstrap: dict[str, Any],
    where: str,
    kappa: str,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """({unit: score_unit(...)}, {unit: its rows}) for each requested unit; a class the unit's rows lack, a
    collapsed model and a small cohort are each said in one line."""
    slides = manifest.get("slides", {})
    patient_of = lambda slide: (slides.get(slide) or {}).get("patient") or slide  # noqa: E731
    scored, by_unit = {}, {}
    for unit in dict.fromkeys(units):
        by_unit[unit] = unit_rows(labeled, unit, rule, patient_of)
        groups = [r["slide"] for r in labeled] if unit == "tissue" and bootstrap["resample"] == "slides" else None
        scored[unit] = score_unit(
            by_unit[unit],
            classes,
            iterations=bootstrap["iterations"],
            level=bootstrap["level"],
            seed=bootstrap["seed"],
            groups=groups,
            unit=unit,
            kappa_weights=kappa,
        )
        say_unit_notes(unit, scored[unit], where)
    return scored, by_unit


def write_unit_predictions(path: Path, unit: str, rows: list[dict[str, Any]], classes: list[str]) -> None:
    """One row per slide or patient: its label, call and scores (full precision: the AUROC can be recomputed)."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([unit, "label", "pred", "windows"] + [f"p_{c}" for c in classes])
        for r in rows:
            writer.writerow([r["unit"], classes[r["y"]], classes[r["pred"]], r["windows"], *map(repr, r["probs"])])
