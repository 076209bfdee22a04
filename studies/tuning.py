"""Tuning KD (ADv1) on validation only (issue 16, part 4). Each variant changes one setting of the demo's KD (ADv1)
and is trained once per seed with the default export pick; every run is scored on the *validation* split, and the
table gives the paired difference against the baseline (and against default KD (ADv1)), pooled over seeds, with its
95% paired-bootstrap CI. The test split is never read.

The baseline, default KD (ADv1) and KD (ADv2) are the selection study's runs (studies/selection.py, same seeds and
teachers): its teachers are copied in, and its exports on the same picks are the references.

    .venv/bin/python studies/tuning.py [--study runs/study-selection --out runs/study-tuning]

Writes <out>/tuning.json and studies/results_tuning.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_shards, pct, plan_for, score_exports, write_study_experiment  # noqa: E402

from hpcdistill.experiment.demo import demo_experiment  # noqa: E402
from hpcdistill.experiment.launch import launch_experiment  # noqa: E402
from hpcdistill.scoring.metrics import difference_ci, paired_differences  # noqa: E402
from hpcdistill.train.selection import uses_ema  # noqa: E402

VARIANTS = {  # name -> (what changes, overrides on top of the demo's KD (ADv1))
    "t4": ("temperature 4 (demo: 2)", ["train.temperature=4.0"]),
    "nopixel": ("no pixel loss (KL·T² only)", ["train.pixel_resize=[]"]),
    "nojitter": (
        "no colour jitter (flips and rot90 only)",
        ["data.augment.brightness=0", "data.augment.contrast=0", "data.augment.saturation=0", "data.augment.hue=0"],
    ),
    "epochs160": ("160 epochs (demo: 80)", ["train.epochs=160"]),
}
# Settings the selection study already trained (same seeds and teachers): their exports on the pick are reused.
FROM_STUDY = {"kd_adv2": "aux set ADv1+ADv2 (60 slides; demo: ADv1, 24)"}


def variant_methods(pick: str, ema_decay: float, names: list[str]) -> dict[str, dict]:
    base = demo_experiment()["methods"]["kd_adv1"]
    pick_overrides = [f"train.select_metric={pick}"] + ([f"train.ema_decay={ema_decay}"] if uses_ema(pick) else [])
    return {
        f"kd_adv1_{name}": {
            **base,
            "label": f"KD (ADv1) {name}",
            "overrides": [*base["overrides"], *pick_overrides, *VARIANTS[name][1]],
        }
        for name in names
    }


def reuse_teachers(study_exp: Path, exp_dir: Path) -> None:
    """The selection study's finished teachers (same config, same seeds): a finished run reruns as a no-op."""
    for teacher in study_exp.glob("teacher*"):
        if not (exp_dir / teacher.name).exists():
            shutil.copytree(teacher, exp_dir / teacher.name)


def pooled(a: list[dict], b: list[dict]) -> tuple[float, float, float, float]:
    """a - b in macro OvR accuracy on the same val samples, per seed, resampled alike; pooled over seeds."""
    points, resampled = [], []
    for sa, sb in zip(sorted(a, key=lambda s: s["seed"]), sorted(b, key=lambda s: s["seed"])):
        assert sa["seed"] == sb["seed"] and sa["keys"] == sb["keys"], "paired runs must share seed and samples"
        point, diffs = paired_differences(sa["y"], sa["pred"], sb["pred"], sa["classes"], iterations=10000)
        points.append(point["accuracy"])
        resampled.append(diffs["accuracy"])
    return difference_ci(float(np.mean(points)), np.concatenate(resampled))


def fmt(d: tuple[float, float, float, float]) -> str:
    return f"{100 * d[0]:+.1f} ({100 * d[1]:+.1f} to {100 * d[2]:+.1f}), p={d[3]:.3f}"


def table(scores: dict[tuple[str, float], list[dict]], rows: list[tuple[str, str]], mags: list[float]) -> str:
    lines = [
        "| variant | mag | val acc (mean of seeds) | − Baseline, paired CI | − KD (ADv1), paired CI |",
        "|---|---|---|---|---|",
    ]
    for key, label in rows:
        for mag in mags:
            runs = scores[(key, mag)]
            mean = pct(float(np.mean([s["accuracy"] for s in runs])))
            vs_base = fmt(pooled(runs, scores[("baseline", mag)])) if key != "baseline" else "-"
            vs_kd = fmt(pooled(runs, scores[("kd_adv1", mag)])) if key not in ("baseline", "kd_adv1") else "-"
            lines.append(f"| {label} | {mag:g}x | {mean} | {vs_base} | {vs_kd} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="runs/study-selection", help="the selection study's output folder")
    ap.add_argument("--out", default="runs/study-tuning")
    ap.add_argument("--data", default="runs/demo/synthetic")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pick", default="loss", help="the export pick for KD runs (the selection study's winner)")
    ap.add_argument("--baseline-pick", default="ema_accuracy", help="the export pick for the baseline")
    ap.add_argument("--ema-decay", type=float, default=0.998)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the shortened demo's data and epochs: a smoke run")
    args = ap.parse_args()
    started = time.monotonic()
    plan, out, study_exp = plan_for(args.quick), Path(args.out), Path(args.study) / "experiment"
    shards = demo_shards(Path(args.data), args.workers, plan)
    names = args.variants.split(",")
    experiment = write_study_experiment(
        out, shards, plan, args.seeds, variant_methods(args.pick, args.ema_decay, names), evaluate=False
    )
    reuse_teachers(study_exp, out / "experiment")
    record = launch_experiment(experiment, cluster="local")
    mags = sorted({t["mag"] for job in record["jobs"] if job["kind"] == "method" for t in job["tasks"]}, reverse=True)
    exports = {}  # (method key, mag) -> export files, one per seed
    for job in record["jobs"]:
        for t in job["tasks"] if job["kind"] == "method" else []:
            exports.setdefault((job["key"], t["mag"]), []).append(Path(t["run_dir"]) / "best.pt")
    for key, pick in (("baseline", args.baseline_pick), ("kd_adv1", args.pick), *((k, args.pick) for k in FROM_STUDY)):
        for mag in mags:
            exports[(key, mag)] = [run / f"best-{pick}.pt" for run in sorted(study_exp.glob(f"{key}-{mag:g}x-s*"))]
    flat = [(cell, path) for cell, paths in exports.items() for path in paths]
    scored = score_exports([p for _, p in flat], shards, "val", args.workers)
    scores: dict[tuple[str, float], list[dict]] = {}
    for (cell, _), s in zip(flat, scored):
        scores.setdefault(cell, []).append(s)
    rows = [("baseline", "Baseline"), ("kd_adv1", "KD (ADv1), demo settings")]
    rows += [*FROM_STUDY.items(), *((f"kd_adv1_{n}", VARIANTS[n][0]) for n in names)]
    text = table(scores, rows, mags)
    header = (
        f"Tuning KD (ADv1) on validation: {args.seeds} seeds, picks {args.pick} (KD) / {args.baseline_pick} "
        f"(baseline); macro one-vs-rest accuracy on the val split (%); paired differences pooled over seeds "
        f"(10,000 resamples each), with P(difference <= 0); {(time.monotonic() - started) / 60:.0f} min.\n\n"
    )
    if not args.quick:
        Path(__file__).with_name("results_tuning.md").write_text(header + text + "\n")
    (out / "tuning.json").write_text(json.dumps({str(k): v for k, v in scores.items()}, indent=1))
    print(header + text)


if __name__ == "__main__":
    main()
