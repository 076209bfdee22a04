"""What reading the pyramid costs in accuracy (issue 24). The demo's dataset, written with scanner-like pyramids
(each level the one above shrunk with an area filter and JPEG-encoded again), is sharded twice: `--source level0`
(the paper: Lanczos from level 0) and `--source pyramid` (Lanczos from the smallest level at or above each
magnification, the pixels `predict --read pyramid` sees). A student (the demo's baseline recipe) is trained at 2.5x
and at 1.25x on each. Every student is scored on both test sets, which hold the same tissue windows (same sample
keys), so each comparison is paired:

- mismatch: trained on level 0, read from level 0 vs read from the pyramid;
- matched: trained and read from the pyramid vs trained and read from level 0.

Each condition is trained with several seeds; the paired differences pool the seeds' predictions.

    .venv/bin/python studies/pyramid.py [--out runs/study-pyramid] [--quick]

Writes <out>/pyramid.json and studies/results_pyramid.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_sd, pct, plan_for, score_exports  # noqa: E402

from hpcdistill.common.mags import mag_name  # noqa: E402
from hpcdistill.scoring.metrics import paired_bootstrap  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAGS = (2.5, 1.25)
SOURCES = ("level0", "pyramid")
RECIPE = ["train.epochs=80", "data.epoch_samples=64", "train.grad_accum=1"]  # the demo experiment's baseline


def prepare(out: Path, quick: bool) -> dict[str, Path]:
    from hpcdistill.shards.sharding import ShardParams, run_sharding
    from hpcdistill.synthetic.dataset import write_dataset
    from hpcdistill.synthetic.specs import DatasetSpec

    plan = plan_for(quick)
    slides, labels = out / "slides", out / "slides" / "labels.csv"
    if not labels.is_file():
        write_dataset(
            slides, DatasetSpec(slides_per_split=plan.slides, aux1=0, aux2=0, size=plan.size, pyramid="scanner")
        )
    shards = {}
    for source in SOURCES:
        shards[source] = out / f"shards-{source}"
        params = ShardParams(mags=(10.0, *MAGS), source=source)
        run_sharding([slides], shards[source], labels_csv=str(labels), params=params, workers=2, progress=False)
    return shards


def train(job: tuple[str, str, float, str, int, bool]) -> str:
    """One student run in its own process; returns its best.pt."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from hpcdistill.config.loading import load_config
    from hpcdistill.train.loop import run

    out, shards, mag, source, seed, quick = job
    name = f"baseline-{mag_name(mag)}-{source}" + (f"-s{seed}" if seed else "")
    overrides = [f"run.out_dir={out}", f"run.name={name}", f"data.shards={shards}", f"run.seed={seed}"]
    overrides += [f"data.mag={mag}", "log.progress=false", *RECIPE]
    overrides += list(plan_for(quick).overrides)
    return run(load_config(REPO / "configs/demo/baseline.yaml", overrides))["best_path"]


def pooled(runs: list[dict]) -> dict:
    """Seeds scored on the same windows, concatenated: one paired comparison over every (seed, window)."""
    return {k: [v for r in runs for v in r[k]] for k in ("keys", "y", "pred")} | {"classes": runs[0]["classes"]}


def compare(a: dict, b: dict, iterations: int) -> tuple[float, float, float]:
    assert a["keys"] == b["keys"], "the two test sets must hold the same windows"
    diff = paired_bootstrap(a["y"], a["pred"], b["pred"], a["classes"], iterations=iterations)["accuracy"]
    return diff[0], diff[1], diff[2]


CONDITIONS = (("level0", "level0"), ("level0", "pyramid"), ("pyramid", "pyramid"), ("pyramid", "level0"))


def table(scores: dict[str, list[dict]], iterations: int) -> str:
    head = (
        "| mag | trained on | read from | accuracy, mean ± sd over seeds | vs trained and read level 0 (paired 95% CI)"
    )
    rows = [head + " |", "|---|---|---|---|---|"]
    for mag in MAGS:
        ref = pooled(scores[f"{mag_name(mag)}|level0|level0"])
        for trained, read in CONDITIONS:
            runs = scores[f"{mag_name(mag)}|{trained}|{read}"]
            mean, sd = mean_sd([r["accuracy"] for r in runs])
            diff = ""
            if (trained, read) != ("level0", "level0"):
                diff = "{:+.1f} ({:+.1f} to {:+.1f})".format(*(100 * v for v in compare(pooled(runs), ref, iterations)))
            rows.append(f"| {mag_name(mag)} | {trained} | {read} | {pct(mean)} ± {pct(sd)} | {diff} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "study-pyramid"))
    parser.add_argument("--quick", action="store_true", help="the shortened demo's data and epochs (a smoke run)")
    parser.add_argument("--iterations", type=int, default=10000)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per condition (0, 1, ...)")
    args = parser.parse_args()
    out, started = Path(args.out), time.monotonic()
    shards = prepare(out, args.quick)
    seeds = range(args.seeds)
    runs = [(mag, source, seed) for mag in MAGS for source in SOURCES for seed in seeds]
    jobs = [(str(out), str(shards[source]), mag, source, seed, args.quick) for mag, source, seed in runs]
    with ProcessPoolExecutor(2) as pool:
        exports = [Path(best) for best in pool.map(train, jobs)]
    scores: dict[str, list[dict]] = {}
    for read in SOURCES:
        for (mag, source, _), s in zip(runs, score_exports(exports, shards[read], "test", 2)):
            scores.setdefault(f"{mag_name(mag)}|{source}|{read}", []).append(s)
    text = table(scores, args.iterations)
    minutes = (time.monotonic() - started) / 60
    summary = {
        k: [{"export": r["export"], "accuracy": r["accuracy"], "f1": r["f1"]} for r in v] for k, v in scores.items()
    }
    (out / "pyramid.json").write_text(json.dumps(summary, indent=1))
    head = "# Reading the pyramid: accuracy on the demo's test split\n\n"
    windows = len(scores[f"{mag_name(MAGS[0])}|level0|level0"][0]["y"])
    note = (
        f"\n\nBaseline students (the demo's recipe), {args.seeds} training seeds per condition, {windows} test "
        "windows; "
        f"differences paired over (seed, window) pairs, {args.iterations:,} bootstrap resamples; {minutes:.0f} min "
        "on this machine (`.venv/bin/python studies/pyramid.py`).\n"
    )
    body = head + text + note
    print(body)
    if not args.quick:
        (REPO / "studies" / "results_pyramid.md").write_text(body)


if __name__ == "__main__":
    main()
