"""Which training recipe survives new data (issue 25): teachers trained with each candidate recipe on two synthetic
datasets made the same way (the demo's, and one about three times larger written with another seed), several seeds
each, judged on validation only. Then, for the chosen recipe on the larger set, the students at 1.25x (baseline and
KD with ADv1), whose paired KD (ADv1) - Baseline difference on the test split is the paper's claim.

    .venv/bin/python studies/recipe.py teachers --size large --candidates cosine_acc4,cosine_acc1,constant
    .venv/bin/python studies/recipe.py students --size large --candidate cosine_acc4
    .venv/bin/python studies/recipe.py table

Each run appends to <out>/recipe.json; `table` writes studies/results_recipe.md from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FULL, demo_shards, score_exports  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The candidates, as overrides of configs/demo/*.yaml. "constant" is the demo's recipe before issue 25: a fixed 64
# tissues per epoch whatever the data, constant lr, micro-batch 1 without accumulation.
CANDIDATES = {
    "constant": ["train.epochs=40", "data.epoch_samples=64", "train.grad_accum=1"],
    "cosine_acc1": [
        "train.epochs=40",
        "data.epoch_passes=1",
        "train.grad_accum=1",
        "train.schedule=cosine",
        "train.warmup_epochs=2",
    ],
    "cosine_acc4": [
        "train.epochs=40",
        "data.epoch_passes=1",
        "train.grad_accum=4",
        "train.schedule=cosine",
        "train.warmup_epochs=2",
    ],
}
STUDENT_MAG = 1.25
LARGE = {"seed": 7, "slides": "train=60,val=40,test=50", "aux1": 30}  # 150 labelled slides


def shards_for(size: str, out: Path) -> Path:
    """The demo's shards (seed 0), or the larger set's (seed 7: a set the demo never sees)."""
    if size == "demo":
        return demo_shards(out / "demo", 2, FULL)
    shards = out / "large" / "shards"
    if not (shards / "manifest.json").is_file():
        raise SystemExit(
            f"{shards}: write it first: hpcdistill synth --out {out}/large/slides --slides-per-split "
            f"{LARGE['slides']} --aux1 {LARGE['aux1']} --aux2 0 --size 3072x2304 --pyramid scanner --seed "
            f"{LARGE['seed']} && hpcdistill shard {out}/large/slides --labels {out}/large/slides/labels.csv "
            f"--mags 10,2.5,1.25 --out {shards}"
        )
    return shards


def train(job: tuple[str, str, str, list[str]]) -> dict:
    """One run in its own process (one thread); returns its summary and the export's recorded validation."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    from hpcdistill.config.loading import load_config
    from hpcdistill.train.loop import run

    torch.set_num_threads(1)
    config, out, name, overrides = job
    started = time.monotonic()
    summary = run(
        load_config(REPO / config, [f"run.out_dir={out}", f"run.name={name}", "log.progress=false", *overrides])
    )
    best = torch.load(summary["best_path"], weights_only=True)
    return {
        "name": name,
        "best_path": summary["best_path"],
        "val_at_pick": best["val"],
        "steps": summary["global_step"],
        "minutes": (time.monotonic() - started) / 60,
    }


def run_jobs(jobs: list[tuple[str, str, str, list[str]]], record: Path, kind: str, extra: dict) -> None:
    with ProcessPoolExecutor(2) as pool:
        for result in pool.map(train, jobs):
            rows = json.loads(record.read_text()) if record.is_file() else []
            rows.append({"kind": kind, **extra, **result})
            record.write_text(json.dumps(rows, indent=1))
            print(json.dumps(rows[-1]), flush=True)


def teachers(args: argparse.Namespace, out: Path) -> None:
    shards = shards_for(args.size, out)
    for candidate in args.candidates.split(","):
        jobs = [
            (
                "configs/demo/teacher.yaml",
                str(out / args.size / candidate),
                f"teacher-s{seed}",
                [f"data.shards={shards}", f"run.seed={seed}", *CANDIDATES[candidate]],
            )
            for seed in range(args.seeds)
        ]
        run_jobs(jobs, out / "recipe.json", "teacher", {"size": args.size, "candidate": candidate})


def students(args: argparse.Namespace, out: Path) -> None:
    shards, runs = shards_for(args.size, out), out / args.size / args.candidate
    common = [f"data.shards={shards}", f"data.mag={STUDENT_MAG}", *CANDIDATES[args.candidate]]
    jobs = []
    for seed in range(args.seeds):
        teacher = runs / f"teacher-s{seed}" / "best.pt"
        jobs.append(("configs/demo/baseline.yaml", str(runs), f"baseline-s{seed}", [*common, f"run.seed={seed}"]))
        jobs.append(
            (
                "configs/demo/distill.yaml",
                str(runs),
                f"kd_adv1-s{seed}",
                [*common, f"run.seed={seed}", f"teacher.checkpoint={teacher}", "data.aux=[aux1]"],
            )
        )
    run_jobs(jobs, out / "recipe.json", "student", {"size": args.size, "candidate": args.candidate})


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * sd:.1f} (min {100 * min(values):.1f})"


def paired_line(rows: list[dict], shards: Path, iterations: int) -> str:
    """KD (ADv1) - Baseline on the test split, pooled over seeds, paired over (seed, tissue)."""
    from hpcdistill.scoring.metrics import paired_bootstrap

    pick = {r["name"]: Path(r["best_path"]) for r in rows}
    seeds = sorted({n.rsplit("-s", 1)[1] for n in pick})
    base = score_exports([pick[f"baseline-s{s}"] for s in seeds], shards, "test", 2)
    kd = score_exports([pick[f"kd_adv1-s{s}"] for s in seeds], shards, "test", 2)
    y = [v for r in base for v in r["y"]]
    diff = paired_bootstrap(
        y,
        [v for r in kd for v in r["pred"]],
        [v for r in base for v in r["pred"]],
        base[0]["classes"],
        iterations=iterations,
    )["accuracy"]
    test = ", ".join(
        f"Baseline {100 * b['accuracy']:.1f} / KD (ADv1) {100 * k['accuracy']:.1f}" for b, k in zip(base, kd)
    )
    return (
        f"KD (ADv1) - Baseline at {STUDENT_MAG:g}x on the test split, pooled over {len(seeds)} seeds: "
        f"{100 * diff[0]:+.1f} points (95% CI {100 * diff[1]:+.1f} to {100 * diff[2]:+.1f}); per seed: {test}"
    )


def table(out: Path, iterations: int) -> str:
    rows = json.loads((out / "recipe.json").read_text())
    lines = [
        "| dataset | recipe | run | seeds | val accuracy at the pick, mean ± sd (min) | steps | minutes per run |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["size"], r["candidate"], r["name"].rsplit("-s", 1)[0]), []).append(r)
    for (size, candidate, run), group in sorted(groups.items()):
        acc = [g["val_at_pick"]["accuracy"] for g in group]
        lines.append(
            f"| {size} | {candidate} | {run} | {len(group)} | {spread(acc)} | {group[0]['steps']} | "
            f"{statistics.fmean(g['minutes'] for g in group):.1f} |"
        )
    for candidate in sorted({r["candidate"] for r in rows if r["kind"] == "student"}):
        students_rows = [r for r in rows if r["kind"] == "student" and r["candidate"] == candidate]
        line = paired_line(students_rows, shards_for(students_rows[0]["size"], out), iterations)
        lines += ["", f"- {candidate} ({students_rows[0]['size']} set): {line}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=["teachers", "students", "table"])
    parser.add_argument("--out", default=str(REPO / "runs" / "study-recipe"))
    parser.add_argument("--size", choices=["demo", "large"], default="large")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--candidate", default="cosine_acc4")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10000)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "teachers":
        teachers(args, out)
    elif args.phase == "students":
        students(args, out)
    else:
        text = table(out, args.iterations)
        print(text)
        (REPO / "studies" / "results_recipe.md").write_text(f"# The training recipe on new data\n\n{text}\n")


if __name__ == "__main__":
    main()
