"""Sharding throughput and peak memory, side by side in one run.

Throughput, in level-0 Mpix of tissue per second (wall clock) and per CPU second, on a synthetic 40x Aperio SVS
(default 20480x16384), over the same regions (the tissue boxes `hpcdistill shard` finds; each is one window at
the default --max-size) and the same magnifications:
  shard  `hpcdistill shard` end to end, one worker: open, thumbnail, tissue boxes, QC PNG, every mag Lanczos3
         from level 0, JPEG q90, tars, manifest
  (a)    bare pyvips, vips defaults: for each region and each mag, crop of level 0 + `reduce` (Lanczos3) to the
         mag's size, to memory. The ceiling: no tissue finding, no encoding, no writing
  (a')   stricter, not the issue's definition: as (a), but each region is decoded once into memory first (copy_memory)
  (a'')  stricter still: as (a'), but decoded into a buffer vips wraps, as `shard` does (vips' reducev reads a
         copy_memory() image up to 2x slower here)
  (b)    what peers do: one OpenSlide read_region (level 0) per region + PIL LANCZOS resize to each mag
CPU seconds are the process's user+system time (all threads): steadier than wall clock on a shared machine.
(a) and shard run with the same VIPS_CONCURRENCY (1 unless set); (b) is single-threaded anyway.
Also: the per-slide fixed costs (thumbnail, tissue boxes, QC PNG) in CPU seconds, and peak RSS (VmHWM) of
sharding a 60000x60000 slide vs a 20000x20000 one, each in a fresh subprocess with the CLI defaults.

  .venv/bin/python bench/bench_shard.py [--workdir bench/out] [--markdown bench/results_shard.md] [--no-rss]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("VIPS_CONCURRENCY", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import openslide  # noqa: E402
import pyvips  # noqa: E402
from PIL import Image  # noqa: E402

from hpcdistill.shards import sharding
from hpcdistill.slides import (
    resample,  # noqa: E402
    tissue,
)
from hpcdistill.slides.factory import open_slide
from hpcdistill.slides.slide import target_size
from hpcdistill.slides.windows import split_windows  # noqa: E402
from hpcdistill.synthetic import dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import describe, median_spread  # noqa: E402

MAGS = (10.0, 5.0, 2.5, 1.25, 0.625)
BASE_MAG = 40.0
NOTES_MARKER = "<!-- notes: hand-written, kept when the tables above are regenerated -->"
LABELS = {"a": "(a)", "a_once": "(a')", "a_buffer": "(a'')", "b": "(b)"}
TARGETS = {
    "a": " (target >= 0.7)",
    "a_once": " (target >= 0.8)",
    "a_buffer": " (no target: a stricter ceiling)",
    "b": " (target >= 2.5)",
}


def ensure_slide(path: Path, width: int, height: int, n_tissues: int, seed: int) -> Path:
    if not path.exists():
        t0 = time.perf_counter()
        dataset.write_slide(
            path,
            dataset.SlideSpec(width, height, fmt="svs", base_mag=BASE_MAG, class_id=1, seed=seed, tissues=n_tissues),
        )
        print(f"wrote {path.name} ({width}x{height}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) and of its waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measured(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def tissue_regions(path: Path, params: sharding.ShardParams) -> list[tuple[int, int, int, int]]:
    """The tissue boxes `hpcdistill shard` finds; at these params each box is one window (checked)."""
    with open_slide(path) as slide:
        size = (slide.info.width, slide.info.height)
        thumb, scale = slide.thumbnail(params.tissue.thumb_size)
        boxes = tissue.find_tissue_boxes(thumb, scale, params.tissue, slide_size=size)
        for box in boxes:
            if split_windows(box, size, slide.info.base_mag, params.windowing) != [box]:
                raise SystemExit(f"box {box} is split into windows: raise --max-size so regions are whole boxes")
    return boxes


def sizes_for(region: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    return [target_size((region[2], region[3]), BASE_MAG, mag) for mag in MAGS]


def run_vips(path: Path, regions: list) -> None:
    level0 = pyvips.Image.new_from_file(str(path))
    for x, y, w, h in regions:
        for out_w, out_h in sizes_for((x, y, w, h)):
            level0.crop(x, y, w, h).reduce(w / out_w, h / out_h, kernel="lanczos3").numpy()


def run_vips_decode_once(path: Path, regions: list) -> None:
    level0 = pyvips.Image.new_from_file(str(path))
    for x, y, w, h in regions:
        crop = level0.crop(x, y, w, h).copy_memory()
        for out_w, out_h in sizes_for((x, y, w, h)):
            crop.reduce(w / out_w, h / out_h, kernel="lanczos3").numpy()


def run_vips_decode_to_buffer(path: Path, regions: list) -> None:
    """(a'') as (a'), but each region decoded into a buffer vips wraps (how `shard` decodes): vips' reducev reads
    a copy_memory() image up to 2x slower, so this is the stricter ceiling."""
    level0 = pyvips.Image.new_from_file(str(path))
    for x, y, w, h in regions:
        region = resample.decoded(level0.crop(x, y, w, h))
        for out_w, out_h in sizes_for((x, y, w, h)):
            region.reduce(w / out_w, h / out_h, kernel="lanczos3").numpy()


def run_openslide_pil(path: Path, regions: list) -> None:
    with openslide.OpenSlide(str(path)) as osr:
        for x, y, w, h in regions:
            region = osr.read_region((x, y), 0, (w, h)).convert("RGB")
            for size in sizes_for((x, y, w, h)):
                np.asarray(region.resize(size, Image.Resampling.LANCZOS))
            del region


def run_shard(path: Path, out: Path, params: sharding.ShardParams) -> None:
    sharding.run_sharding([path], out, params=params, overwrite=True, progress=False)


def fixed_costs(path: Path, params: sharding.ShardParams, qc_path: Path) -> dict[str, float]:
    """CPU seconds of the per-slide work the ceiling does not do: open, thumbnail, tissue boxes, QC PNG."""
    t0 = cpu_seconds()
    with open_slide(path) as slide:
        t1 = cpu_seconds()
        thumb, scale = slide.thumbnail(params.tissue.thumb_size)
        t2 = cpu_seconds()
        boxes = tissue.find_tissue_boxes(thumb, scale, params.tissue, slide_size=(slide.info.width, slide.info.height))
        t3 = cpu_seconds()
        tissue.write_qc_png(qc_path, thumb, boxes, scale, labels=[f"t{i:03d}" for i in range(len(boxes))])
        t4 = cpu_seconds()
    cpu = {"open": t1 - t0, "thumbnail": t2 - t1, "tissue boxes": t3 - t2, "QC PNG": t4 - t3}
    cpu["total"] = t4 - t0
    return cpu


def peak_rss_child(path: Path, out: Path) -> None:
    """Runs in a fresh interpreter: shard with the CLI defaults, print VmHWM in bytes."""
    sharding.run_sharding([path], out, params=sharding.ShardParams(), overwrite=True, progress=False)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(int(line.split()[1]) * 1024)


def peak_rss(path: Path, out: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(path), str(out)], capture_output=True, text=True, check=True
    )
    return int(result.stdout.split()[-1]), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench/out")
    parser.add_argument("--size", default="20480x16384", help="throughput slide, WIDTHxHEIGHT at 40x")
    parser.add_argument("--markdown", default="bench/results_shard.md")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (medians and ranges over them)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS runs (quick check)")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return peak_rss_child(Path(args.rss_child[0]), Path(args.rss_child[1]))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    width, height = map(int, args.size.lower().split("x"))
    slide = ensure_slide(work / f"bench_{width}x{height}.svs", width, height, n_tissues=4, seed=11)
    params = sharding.ShardParams(mags=MAGS)
    regions = tissue_regions(slide, params)
    mpix = sum(w * h for *_, w, h in regions) / 1e6
    print(describe())
    print(f"{slide.name}: {len(regions)} tissue regions, {mpix:.0f} level-0 Mpix, mags {MAGS}", flush=True)

    pipelines = {
        "shard": lambda: run_shard(slide, work / "shards", params),
        "a": lambda: run_vips(slide, regions),
        "a_once": lambda: run_vips_decode_once(slide, regions),
        "a_buffer": lambda: run_vips_decode_to_buffer(slide, regions),
        "b": lambda: run_openslide_pil(slide, regions),
    }
    rounds: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in pipelines}, "cpu": {n: [] for n in pipelines}}
    fixed_rounds: list[dict[str, float]] = []
    for _ in range(args.repeat):  # interleaved rounds: machine noise hits every pipeline alike
        for name, run in pipelines.items():
            seconds, cpu_s = measured(run)
            rounds["wall"][name].append(seconds)
            rounds["cpu"][name].append(cpu_s)
        fixed_rounds.append(fixed_costs(slide, params, work / "qc_fixed_cost.png"))
    fixed = {k: statistics.median(r[k] for r in fixed_rounds) for k in fixed_rounds[0]}
    seconds = {m: {n: statistics.median(v) for n, v in by.items()} for m, by in rounds.items()}
    # per-round ratios of rates (round i of shard with round i of the reference), then their median and range
    ratios = {
        (m, ref): median_spread([r / s for s, r in zip(by["shard"], by[ref])])
        for m, by in rounds.items()
        for ref in LABELS
    }
    for name in pipelines:
        print(
            f"{name:6s} wall {seconds['wall'][name]:6.2f} s {mpix / seconds['wall'][name]:6.1f} Mpix/s   "
            f"CPU {seconds['cpu'][name]:6.2f} s {mpix / seconds['cpu'][name]:6.1f} Mpix/CPU-s (medians)",
            flush=True,
        )
    for measure in ("wall", "cpu"):
        print(
            f"{measure}: "
            + "   ".join(
                f"shard / {LABELS[ref]} = {spread_text(ratios[measure, ref])}{TARGETS[ref]}" for ref in LABELS
            ),
            flush=True,
        )
    print("fixed per-slide CPU s (medians): " + ", ".join(f"{k} {v:.3f}" for k, v in fixed.items()), flush=True)

    rss: dict[str, tuple[int, float]] = {}
    if not args.no_rss:
        # Equal tissue sizes (synthetic tissues fill a grid of 10000-px slots) on slides of 9x the area, then the
        # same big slide with 3 tissues 3x larger a side, whose windows --max-size caps.
        rss_slides = [
            ensure_slide(work / f"rss_{side}x{side}_t{n}.svs", side, side, n_tissues=n, seed=12)
            for side, n in ((20000, 4), (60000, 36), (60000, 3))
        ]
        rss = {p.name: peak_rss(p, work / f"shards_{p.stem}") for p in rss_slides}
        for name, (peak, took) in rss.items():
            print(f"peak RSS {name}: {peak / 2**30:.2f} GiB ({took:.0f} s, CLI defaults)", flush=True)
    if args.markdown:
        target = Path(args.markdown)
        old = target.read_text() if target.exists() else ""
        notes = old[old.index(NOTES_MARKER) :] if NOTES_MARKER in old else NOTES_MARKER + "\n"
        target.write_text(markdown(args, slide, width, height, regions, mpix, seconds, ratios, fixed, rss) + notes)
        print(f"wrote {args.markdown}")


def spread_text(stat: tuple[float, float, float]) -> str:
    return f"{stat[0]:.2f}x ({stat[1]:.2f}-{stat[2]:.2f})"


def markdown(args, slide, width, height, regions, mpix, seconds, ratios, fixed, rss) -> str:
    names = {
        "shard": "`hpcdistill shard` end to end (thumbnail, tissue, QC, 5 mags, JPEG q90, tars, manifest)",
        "a": "(a) bare pyvips: crop + `reduce` lanczos3 per region per mag (ceiling)",
        "a_once": "(a') as (a), each region decoded once into memory first (decode-once bare pipeline)",
        "a_buffer": "(a'') as (a'), decoded into a buffer vips wraps, as `shard` decodes (stricter ceiling)",
        "b": "(b) OpenSlide read_region per region + PIL LANCZOS per mag (peers)",
    }

    def ratio(name: str, measure: str) -> str:
        return "1" if name == "shard" else spread_text(ratios[measure, name]) + TARGETS[name]

    wall, cpu = seconds["wall"], seconds["cpu"]
    lines = [
        "## Sharding benchmark (`bench/bench_shard.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d')} on {describe()}.",
        f"Command: `.venv/bin/python bench/bench_shard.py --repeat {args.repeat}` (VIPS_CONCURRENCY="
        f"{os.environ['VIPS_CONCURRENCY']} for shard and (a); one process each; {args.repeat} interleaved rounds: "
        "median seconds, and the median (lowest-highest) of the per-round ratios).",
        f"Slide: synthetic 40x Aperio SVS {width}x{height} ({slide.name}), {len(regions)} tissue regions "
        f"(the boxes `hpcdistill shard` finds, one window each), {mpix:.0f} level-0 Mpix, "
        f"mags {', '.join(f'{m:g}' for m in MAGS)}.",
        "",
        "| pipeline | wall s | Mpix/s | shard ratio (wall) | CPU s | Mpix/CPU-s | shard ratio (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {names[n]} | {wall[n]:.2f} | {mpix / wall[n]:.1f} | {ratio(n, 'wall')} | {cpu[n]:.2f} | "
            f"{mpix / cpu[n]:.1f} | {ratio(n, 'cpu')} |"
            for n in names
        ],
        "",
        "Per-slide fixed costs inside `shard` (CPU s, medians): "
        + ", ".join(f"{k} {v:.3f}" for k, v in fixed.items())
        + ".",
        "",
    ]
    if rss:
        lines += [
            "| slide `rss_<side>_t<tissues>` (CLI defaults, 1 worker) | peak RSS (VmHWM) | wall s |",
            "|---|---:|---:|",
            *[f"| {name} | {peak / 2**30:.2f} GiB | {seconds:.0f} |" for name, (peak, seconds) in rss.items()],
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
