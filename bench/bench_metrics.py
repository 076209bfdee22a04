"""Bootstrap CIs: the vectorised `bootstrap_ci` (blocks of resamples -> batched confusion matrices) vs the obvious
per-resample loop (`classification_metrics` on each resample), on the same data and the same resample indices,
rounds interleaved. The paper's protocol is 10,000 resamples; a test split is a few hundred to a few thousand tissues.

    .venv/bin/python bench/bench_metrics.py [--samples 2000 --classes 3 --iterations 10000 --rounds 3]

The loop runs `--loop-iterations` resamples (default 1,000) and is scaled to `--iterations`: it is linear in them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hpcdistill.scoring.metrics import METRICS, bootstrap_ci, bootstrap_indices, classification_metrics


def loop_bootstrap(y_true: np.ndarray, y_pred: np.ndarray, k: int, iterations: int, seed: int) -> None:
    values = {name: [] for name in METRICS}
    for block in bootstrap_indices(y_true.size, iterations, seed):
        for idx in block:
            m = classification_metrics(y_true[idx], y_pred[idx], k)
            for name in METRICS:
                values[name].append(m[name])
    for v in values.values():
        np.percentile(v, [2.5, 97.5])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=10000)
    ap.add_argument("--loop-iterations", type=int, default=1000)
    ap.add_argument("--slides", type=int, default=100, help="groups for the slide-level (cluster) bootstrap")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, args.classes, args.samples)
    y_pred = np.where(rng.random(args.samples) < 0.85, y_true, rng.integers(0, args.classes, args.samples))
    slides = rng.integers(0, args.slides, args.samples)
    best = {"vectorised": np.inf, "vectorised, by slide": np.inf, "per-resample loop": np.inf}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        bootstrap_ci(y_true, y_pred, args.classes, iterations=args.iterations)
        t1 = time.perf_counter()
        bootstrap_ci(y_true, y_pred, args.classes, iterations=args.iterations, groups=slides)
        t2 = time.perf_counter()
        loop_bootstrap(y_true, y_pred, args.classes, args.loop_iterations, seed=0)
        t3 = time.perf_counter()
        scale = args.iterations / args.loop_iterations
        for name, seconds in (
            ("vectorised", t1 - t0),
            ("vectorised, by slide", t2 - t1),
            ("per-resample loop", (t3 - t2) * scale),
        ):
            best[name] = min(best[name], seconds)
    print(f"{args.iterations} resamples of {args.samples} samples, {args.classes} classes, best of {args.rounds}")
    print("| bootstrap | seconds | vs loop |\n|---|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} | {best['per-resample loop'] / seconds:.0f}x |")


if __name__ == "__main__":
    main()
