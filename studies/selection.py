"""Which export to keep (issue 16, part 3). Every run of the demo experiment is trained once per seed with an EMA of
its weights and one export per candidate pick (train.export_also); each candidate is then scored on the test split,
and the table compares the seed-to-seed spread of test accuracy per pick. Picks are made on validation only; the
test split only measures them.

    .venv/bin/python studies/selection.py [--out runs/study-selection --seeds 3 --ema-decay 0.998]

Writes <out>/selection.json and studies/results_selection.md. About 45 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_shards, mean_sd, pct, plan_for, score_exports, write_study_experiment  # noqa: E402

from hpcdistill.experiment.demo import demo_experiment  # noqa: E402
from hpcdistill.experiment.launch import launch_experiment  # noqa: E402

# Candidate picks per mode: the metric each best-<metric>.pt is chosen on, plus the final weights.
BASELINE_PICKS = ["accuracy", "loss", "ema_accuracy", "ema_loss"]
DISTILL_PICKS = ["agreement", "kl", "loss", "accuracy", "ema_agreement", "ema_kl", "ema_loss", "ema_accuracy"]
FINAL = {"last": "last.pt", "ema_last": "last-ema.pt"}
PICK_ORDER = [
    "accuracy",
    "agreement",
    "kl",
    "loss",
    "ema_accuracy",
    "ema_agreement",
    "ema_kl",
    "ema_loss",
    "last",
    "ema_last",
]


def study_methods(ema_decay: float) -> dict[str, dict]:
    methods = demo_experiment()["methods"]
    for key, method in methods.items():
        picks = BASELINE_PICKS if key == "baseline" else DISTILL_PICKS
        method["overrides"] = [
            *method.get("overrides", []),
            f"train.ema_decay={ema_decay}",
            f"train.export_also=[{','.join(picks)}]",
        ]
    return methods


def export_files(run_dir: Path, select_metric: str) -> dict[str, Path]:
    """pick name -> export file, for every candidate the run wrote (best.pt is the pick on its select_metric)."""
    found = {p.stem.removeprefix("best-"): p for p in run_dir.glob("best-*.pt")}
    found[select_metric] = run_dir / "best.pt"
    found.update({name: run_dir / file for name, file in FINAL.items() if (run_dir / file).is_file()})
    return found


def table(scores: list[dict], runs: dict[str, tuple[str, float]]) -> tuple[str, dict]:
    """Per pick and per kind of run (baseline; the KD methods): the mean test accuracy, and the seed-to-seed sd of
    test accuracy in each (method, mag) cell, averaged over the cells (and its largest)."""
    cells: dict[tuple[str, str], dict[tuple[str, float], list[float]]] = {}
    for s in scores:
        method, mag = runs[s["run"]]
        kind = "Baseline" if method == "baseline" else "KD"
        cells.setdefault((s["pick"], kind), {}).setdefault((method, mag), []).append(s["accuracy"])
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for (pick, kind), by_cell in cells.items():
        sds = [mean_sd(v)[1] for v in by_cell.values()]
        summary.setdefault(pick, {})[kind] = {
            "cells": len(sds),
            "mean_acc": statistics.fmean(mean_sd(v)[0] for v in by_cell.values()),
            "mean_sd": statistics.fmean(sds),
            "max_sd": max(sds),
        }
    lines = [
        "| pick | Baseline: mean test acc | Baseline: sd over seeds, mean (max) | KD: mean test acc | "
        "KD: sd over seeds, mean (max) |",
        "|---|---|---|---|---|",
    ]
    for pick in PICK_ORDER:
        if pick in summary:
            row = [f"| `{pick}` "] + [
                f"| {pct(k['mean_acc'])} | {pct(k['mean_sd'])} ({pct(k['max_sd'])}) "
                if (k := summary[pick].get(kind))
                else "| - | - "
                for kind in ("Baseline", "KD")
            ]
            lines.append("".join(row) + "|")
    return "\n".join(lines), summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/study-selection")
    ap.add_argument("--data", default="runs/demo/synthetic", help="the demo's slides and shards (made if absent)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ema-decay", type=float, default=0.998)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the shortened demo's data and epochs: a smoke run")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from <out>/selection.json")
    args = ap.parse_args()
    plan = plan_for(args.quick)
    started = time.monotonic()
    out = Path(args.out)
    if args.table_only:
        saved = json.loads((out / "selection.json").read_text())
        print(table(saved["scores"], {r: tuple(v) for r, v in saved["runs"].items()})[0])
        return
    shards = demo_shards(Path(args.data), args.workers, plan)
    experiment = write_study_experiment(out, shards, plan, args.seeds, study_methods(args.ema_decay), evaluate=True)
    record = launch_experiment(experiment, cluster="local")
    tasks = [(job["key"], t) for job in record["jobs"] if job["kind"] == "method" for t in job["tasks"]]
    runs = {t["run_dir"]: (key, t["mag"]) for key, t in tasks}
    exports = [
        (t["run_dir"], pick, path)
        for _, t in tasks
        for pick, path in export_files(Path(t["run_dir"]), t["result"]["select_metric"]).items()
    ]
    scored = score_exports([p for _, _, p in exports], shards, "test", args.workers)
    scores = [
        {"run": run, "pick": pick, **{k: s[k] for k in ("accuracy", "f1", "seed", "mag")}}
        for (run, pick, _), s in zip(exports, scored)
    ]
    text, summary = table(scores, runs)
    minutes = (time.monotonic() - started) / 60
    header = (
        f"Selection study: {args.seeds} seeds, EMA decay {args.ema_decay}, demo data; test accuracy = macro "
        f"one-vs-rest accuracy (%); sd over seeds per (method, magnification) cell, averaged over the cells of "
        f"each kind (largest in brackets); {minutes:.0f} min.\n\n"
    )
    if not args.quick:
        Path(__file__).with_name("results_selection.md").write_text(header + text + "\n")
    (out / "selection.json").write_text(json.dumps({"scores": scores, "runs": runs, "summary": summary}, indent=1))
    print(header + text)


if __name__ == "__main__":
    main()
