"""What both studies share: the demo's data and experiment, launched with extra overrides; scoring exports on a
split in parallel processes; the per-seed table arithmetic."""

from __future__ import annotations

import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from hpcdistill.experiment.demo import FULL, QUICK, DemoPlan, demo_experiment, prepare_data, write_experiment


def plan_for(quick: bool) -> DemoPlan:
    """The demo's dataset and epochs, or with --quick the shortened demo's (a smoke run of the study script)."""
    return QUICK if quick else FULL


def demo_shards(data: Path, workers: int, plan: DemoPlan) -> Path:
    """The demo's synthetic slides and shards (reused where `make demo` already wrote them)."""
    mags = [float(m) for m in demo_experiment()["mags"]]
    return prepare_data(data, plan, mags, workers, seed=0)


def write_study_experiment(
    out: Path, shards: Path, plan: DemoPlan, seeds: int, methods: dict[str, dict[str, Any]], evaluate: bool
) -> Path:
    """The demo experiment with `methods` (key -> {label, config, overrides}) in place of the demo's methods."""
    spec = demo_experiment()
    spec["methods"] = methods
    spec["evaluate"]["enabled"] = evaluate
    out.mkdir(parents=True, exist_ok=True)
    return write_experiment(out, shards, plan, spec, seeds)


def score_export(job: tuple[str, str, str]) -> dict[str, Any]:
    """(export, shards, split) -> the export's macro OvR accuracy and F1 on the split, with its predictions."""
    import torch

    from hpcdistill.evaluate.evaluation import _load_for, predict_split
    from hpcdistill.scoring.metrics import classification_metrics
    from hpcdistill.shards.manifest import read_manifest

    torch.set_num_threads(1)
    export, shards, split = job
    manifest = read_manifest(shards)
    model = _load_for(export, shards, manifest)
    rows = predict_split(model.model, shards, manifest, split, model.mag, model.stats)
    m = classification_metrics([r["y"] for r in rows], [r["pred"] for r in rows], len(model.classes))
    return {
        "export": export,
        "accuracy": float(m["accuracy"]),
        "f1": float(m["f1"]),
        "mag": model.mag,
        "seed": model.config["run"]["seed"],
        "classes": len(model.classes),
        "keys": [r["key"] for r in rows],
        "y": [r["y"] for r in rows],
        "pred": [r["pred"] for r in rows],
    }


def score_exports(exports: list[Path], shards: Path, split: str, workers: int) -> list[dict[str, Any]]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(score_export, [(str(e), str(shards), split) for e in exports]))


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pct(value: float) -> str:
    return f"{100 * value:.1f}"
