"""How long sharding 10,000 slides takes on N array tasks: measured costs here, projected to a cluster.

    VIPS_CONCURRENCY=1 OMP_NUM_THREADS=1 .venv/bin/python bench/bench_shard_scale.py [--slides 10000] [--write-gbps 2]

Measured on this machine, one process per task as on a cluster:
- per slide: wall time of `hpcdistill shard` on synthetic 40x slides of several sizes, fitted as
  fixed cost + level-0 tissue Mpix / rate (the tissue area is what is cut: every window at every magnification);
- per task: starting a task (interpreter, imports, plan) and writing its partial manifest;
- the merge: reading 10,000 slides' records and building the manifest from them.
Stated, not measured (they belong to the cluster): the slides' tissue-area distribution (log-normal), the shared
filesystem's aggregate write bandwidth, and the scheduler's start-up latency per array task.

Projection for N tasks: slides go to tasks by the launcher's own balance (heaviest first); a task's time is its fixed
cost plus its slides'; the array's time is the slowest task's, or the time the filesystem needs for all the bytes,
whichever is longer; then the merge.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpcdistill.cluster.task_array import balance  # noqa: E402
from hpcdistill.shards.manifest import build_manifest  # noqa: E402
from hpcdistill.shards.plan import ShardParams, SlideJob  # noqa: E402
from hpcdistill.shards.sharding import preview_sharding, run_sharding  # noqa: E402
from hpcdistill.synthetic.dataset import write_slide  # noqa: E402
from hpcdistill.synthetic.specs import SlideSpec  # noqa: E402

MAGS = (10.0, 5.0, 2.5, 1.25, 0.625)


def measure_slides(sizes: list[tuple[int, int]], root: Path) -> tuple[float, float, float]:
    """(fixed s per slide, level-0 Mpix per s, output bytes per Mpix) from sharding one slide of each size."""
    seconds, mpix, out_bytes = [], [], []
    for i, (w, h) in enumerate(sizes):
        slide = root / f"s{i}.svs"
        write_slide(slide, SlideSpec(w, h, fmt="svs", base_mag=40, class_id=i % 3, seed=i, tissues=3))
        out = root / f"out{i}"
        start = time.perf_counter()
        run_sharding([slide], out, params=ShardParams(mags=MAGS), progress=False)
        seconds.append(time.perf_counter() - start)
        tars = list(out.glob("*.tar"))
        plan = preview_sharding([slide], root / f"plan{i}", params=ShardParams(mags=MAGS))  # its tissue area
        mpix.append(sum(row.get("tissue_area", 0) for row in plan["slides"]) / 1e6)
        out_bytes.append(sum(t.stat().st_size for t in tars))
    slope, fixed = np.polyfit(mpix, seconds, 1)
    return max(fixed, 0.0), 1.0 / slope, float(np.sum(out_bytes) / np.sum(mpix))


def measure_task_start() -> float:
    """Seconds for a fresh interpreter to import what an array task runs (best of 3)."""
    code = "import hpcdistill.shards.array, hpcdistill.shards.sharding, hpcdistill.cluster.resubmitting, submitit"
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def measure_merge(slides: int, samples_per_slide: int) -> float:
    """Seconds to read `slides` records from JSON and build the manifest from them (the merge job's work)."""
    rng = np.random.default_rng(0)
    params = ShardParams(mags=MAGS)
    names = ["10x", "5x", "2.5x", "1.25x", "0.625x"]
    jobs, records = [], {}
    for i in range(slides):
        name = f"slide{i:05d}"
        jobs.append(SlideJob(f"/data/{name}.svs", name, f"p{i}", "a", 0, "train"))
        sizes = [{m: [int(v) for v in rng.integers(50, 900, 2)] for m in names} for _ in range(samples_per_slide)]
        records[name] = {
            "status": "ok",
            "reason": None,
            "split": "train",
            "patient": f"p{i}",
            "label": "a",
            "file": f"{name}.svs",
            "tissues": samples_per_slide,
            "samples": samples_per_slide,
            "base_mag": 40.0,
            "mag_source": "objective-power",
            "sample_tissues": list(range(samples_per_slide)),
            "sizes": sizes,
            "pixel_sums": {m: [float(v) for v in rng.random(7)] for m in names},
        }
    text = json.dumps(records)
    start = time.perf_counter()
    build_manifest(params, {"params": "x"}, ["a"], jobs, json.loads(text), {}, "bench")
    return time.perf_counter() - start


def project(
    args: argparse.Namespace, fixed: float, rate: float, bytes_per_mpix: float, task_start: float, merge: float
) -> list[dict]:
    cost = slide_costs(args, fixed, rate)
    total_bytes = float(((cost - fixed - args.metadata_s) * rate).sum() * bytes_per_mpix)
    rows = []
    for tasks in args.tasks:
        loads = [sum(cost[i] for i in task) for task in balance(list(cost), tasks)]
        compute = max(loads) + task_start + args.scheduler_s
        io = total_bytes / (args.write_gbps * 1e9)
        wall = max(compute, io) + merge
        bound = (
            "write bandwidth"
            if io > compute
            else "the largest slide"
            if max(loads) <= 1.05 * cost.max()
            else "slowest task"
        )
        rows.append(
            {
                "tasks": tasks,
                "hours": wall / 3600,
                "compute_h": compute / 3600,
                "io_h": io / 3600,
                "bound": bound,
                "efficiency": cost.sum() / tasks / (wall - merge) if tasks else 1.0,
            }
        )
    return rows


def slide_costs(args: argparse.Namespace, fixed: float, rate: float) -> np.ndarray:
    """Seconds per slide: the stated tissue-area distribution at the measured rate (seeded, so runs compare)."""
    mpix = np.random.default_rng(1).lognormal(np.log(args.median_gpix * 1000), args.sigma, args.slides)
    return fixed + args.metadata_s + mpix / rate


def largest_slide_s(args: argparse.Namespace, fixed: float, rate: float) -> float:
    return float(slide_costs(args, fixed, rate).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=10000)
    parser.add_argument("--median-gpix", type=float, default=1.0, help="median level-0 tissue area per slide, Gpix")
    parser.add_argument("--sigma", type=float, default=0.6, help="log-normal spread of the tissue area")
    parser.add_argument("--write-gbps", type=float, default=2.0, help="shared filesystem aggregate write, GB/s")
    parser.add_argument("--metadata-s", type=float, default=0.05, help="per-slide open/stat cost on the shared FS, s")
    parser.add_argument("--scheduler-s", type=float, default=10.0, help="array task start-up latency, s")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 64, 256, 1024, 4096])
    parser.add_argument("--quick", action="store_true", help="smaller measurement slides")
    args = parser.parse_args()
    sizes = [(4096, 3072), (8192, 6144), (12288, 9216)] if not args.quick else [(2048, 1536), (4096, 3072)]
    with tempfile.TemporaryDirectory() as tmp:
        fixed, rate, bytes_per_mpix = measure_slides(sizes, Path(tmp))
    task_start = measure_task_start()
    merge = measure_merge(args.slides, samples_per_slide=4)
    print(
        f"measured: {rate:.1f} level-0 tissue Mpix/s per core, {fixed:.2f} s fixed per slide, "
        f"{bytes_per_mpix / 1e3:.1f} kB of shards per tissue Mpix, {task_start:.2f} s to start a task, "
        f"{merge:.2f} s to merge {args.slides} slides"
    )
    print(
        f"stated: {args.slides} slides, tissue area log-normal (median {args.median_gpix:g} Gpix, sigma "
        f"{args.sigma:g}), {args.write_gbps:g} GB/s shared write, {args.metadata_s:g} s metadata per slide, "
        f"{args.scheduler_s:g} s scheduler start-up per task; the largest slide alone takes "
        f"{largest_slide_s(args, fixed, rate) / 60:.1f} min\n"
    )
    print("| tasks | wall (h) | slowest task (h) | writing all bytes (h) | bound by | efficiency |")
    print("|---:|---:|---:|---:|---|---:|")
    for r in project(args, fixed, rate, bytes_per_mpix, task_start, merge):
        print(
            f"| {r['tasks']} | {r['hours']:.2f} | {r['compute_h']:.2f} | {r['io_h']:.2f} | {r['bound']} | "
            f"{100 * r['efficiency']:.0f}% |"
        )


if __name__ == "__main__":
    main()
