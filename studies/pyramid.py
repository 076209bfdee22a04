"""What reading the pyramid costs in accuracy (issue 24). The demo's dataset, written with scanner-like pyramids
(each level the one above shrunk with an area filter and JPEG-encoded again), is sharded twice: `--source level0`
(the paper: Lanczos from level 0) and `--source pyramid` (Lanczos from the smallest level at or above each
magnification, the pixels `predict --read pyramid` sees). A student (the demo's baseline recipe) is trained at 2.5x
and at 1.25x on each. Every student is scored on both test sets, which hold the same tissue windows (same sample
keys), so each comparison is paired:

- mismatch: trained on level 0, read from level 0 vs read from the pyramid;
- matched: trained and read from the pyramid vs trained and read from level 0.

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
from common import pct, plan_for, score_exports  # noqa: E402

from hpcdistill.common.mags import mag_name  # noqa: E402
from hpcdistill.evaluate.metrics import paired_bootstrap  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAGS = (2.5, 1.25)
SOURCES = ("level0", "pyramid")
RECIPE = ["train.epochs=80", "data.epoch_samples=64", "train.grad_accum=1"]  # the demo experiment's baseline


def prepare(out: Path, quick: bool) -> dict[str, Path]:
    from hpcdistill.shards.sharding import ShardParams, run_sharding
    from hpcdistill.synthetic.dataset import write_dataset

    plan = plan_for(quick)
    slides, labels = out / "slides", out / "slides" / "labels.csv"
    if not labels.is_file():
        write_dataset(slides, n_slides_per_split=plan.slides, n_aux1=0, n_aux2=0, size=plan.size, pyramid="scanner")
    shards = {}
    for source in SOURCES:
        shards[source] = out / f"shards-{source}"
        params = ShardParams(mags=(10.0, *MAGS), source=source)
        run_sharding([slides], shards[source], labels_csv=str(labels), params=params, workers=2, progress=False)
    return shards


def train(job: tuple[str, str, float, str, bool]) -> str:
    """One student run in its own process; returns its best.pt."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from hpcdistill.common.config import load_config
    from hpcdistill.train.loop import run

    out, shards, mag, source, quick = job
    overrides = [f"run.out_dir={out}", f"run.name=baseline-{mag_name(mag)}-{source}", f"data.shards={shards}"]
    overrides += [f"data.mag={mag}", "log.progress=false", *RECIPE]
    overrides += list(plan_for(quick).overrides)
    return run(load_config(REPO / "configs/demo/baseline.yaml", overrides))["best_path"]


def compare(a: dict, b: dict, iterations: int) -> tuple[float, float, float]:
    assert a["keys"] == b["keys"], "the two test sets must hold the same windows"
    diff = paired_bootstrap(a["y"], a["pred"], b["pred"], a["classes"], iterations=iterations)["accuracy"]
    return diff[0], diff[1], diff[2]


def table(scores: dict[str, dict], iterations: int) -> str:
    rows = [
        "| mag | trained on | read from | accuracy | vs trained and read level 0 (paired 95% CI) |",
        "|---|---|---|---|---|",
    ]
    for mag in MAGS:
        ref = scores[f"{mag_name(mag)}|level0|level0"]
        for trained, read in (
            ("level0", "level0"),
            ("level0", "pyramid"),
            ("pyramid", "pyramid"),
            ("pyramid", "level0"),
        ):
            s = scores[f"{mag_name(mag)}|{trained}|{read}"]
            diff = (
                ""
                if s is ref
                else "{:+.1f} ({:+.1f} to {:+.1f})".format(*(100 * v for v in compare(s, ref, iterations)))
            )
            rows.append(f"| {mag_name(mag)} | {trained} | {read} | {pct(s['accuracy'])} | {diff} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "study-pyramid"))
    parser.add_argument("--quick", action="store_true", help="the shortened demo's data and epochs (a smoke run)")
    parser.add_argument("--iterations", type=int, default=10000)
    args = parser.parse_args()
    out, started = Path(args.out), time.monotonic()
    shards = prepare(out, args.quick)
    jobs = [(str(out), str(shards[source]), mag, source, args.quick) for mag in MAGS for source in SOURCES]
    with ProcessPoolExecutor(2) as pool:
        exports = dict(zip([(mag, source) for _, _, mag, source, _ in jobs], pool.map(train, jobs)))
    scores = {}
    for read in SOURCES:
        scored = score_exports([Path(exports[(mag, src)]) for mag in MAGS for src in SOURCES], shards[read], "test", 2)
        for (mag, src), s in zip([(mag, src) for mag in MAGS for src in SOURCES], scored):
            scores[f"{mag_name(mag)}|{src}|{read}"] = s
    text = table(scores, args.iterations)
    minutes = (time.monotonic() - started) / 60
    (out / "pyramid.json").write_text(json.dumps({k: {**v, "keys": len(v["keys"])} for k, v in scores.items()}))
    head = "# Reading the pyramid: accuracy on the demo's test split\n\n"
    windows = len(scores[f"{mag_name(MAGS[0])}|level0|level0"]["y"])
    note = f"\n\n{windows} test windows; paired bootstrap over windows; {minutes:.0f} min on this machine.\n"
    body = head + text + note
    print(body)
    if not args.quick:
        (REPO / "studies" / "results_pyramid.md").write_text(body)


if __name__ == "__main__":
    main()
