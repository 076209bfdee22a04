"""Where the CPU time goes, per stage, in the two data paths: `hpcdistill shard` on the sharding benchmark's slide,
and the training loader (paired, augmented, as training runs it) on the loader benchmark's shard. cProfile
cumulative seconds of the functions that make up each stage, and their share of the whole; the profiler's own
overhead inflates Python-heavy stages a little, so read shares, not absolute speed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_paths.py [--markdown bench/results_profile.md]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VIPS_CONCURRENCY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import describe, publish  # noqa: E402
from bench_loader import write_bench_shard  # noqa: E402
from bench_shard import MAGS, ensure_slide, run_shard  # noqa: E402

from hpcdistill import sharding  # noqa: E402
from hpcdistill.config import AugmentConfig  # noqa: E402
from hpcdistill.data import ShardStream, StreamSpec  # noqa: E402

# stage -> the functions whose cumulative time makes it up: (file suffix, exact name), or ("~", part of a C name)
SHARD_STAGES = {
    "level-0 decode (JPEG tiles into memory)": [("~", "vips_image_copy_memory")],
    "Lanczos3 resampling, every magnification": [("~", "vips_image_write_to_memory")],
    "vips operation set-up (masks, pipelines)": [("~", "vips_cache_operation_build")],
    "thumbnail": [("slides.py", "thumbnail")],
    "tissue finding": [("tissue.py", "find_tissues")],
    "QC PNG": [("tissue.py", "write_qc_png")],
    "JPEG encode": [("shard_cut.py", "encode_image")],
    "tar write (members, fsync, rename)": [("shard_writer.py", "add"), ("shard_writer.py", "commit")],
    "colour statistics for the manifest (labeled train slides; none here)": [("shard_cut.py", "_add_pixel_sums")],
}
LOADER_STAGES = {
    "tar read (members, grouping)": [("shard_reader.py", "raw_samples")],
    "JPEG decode (libjpeg-turbo)": [("~", "'decode' of 'ImagingDecoder'")],
    "JPEG header parse (PIL open)": [("Image.py", "open")],
    "pixel copy out of PIL (tobytes)": [("Image.py", "tobytes")],
    "augmentation draw (flips, rot90, colour map)": [("augment.py", "sample"), ("augment.py", "colour_linear"),
                                                     ("augment.py", "map"), ("augment.py", "pivot")],
    "collate (per-sample arrays into a batch)": [("data.py", "collate")],
}


def stage_seconds(stats: pstats.Stats, stages: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    table = stats.stats  # type: ignore[attr-defined]
    out = {}
    for stage, wanted in stages.items():
        total = 0.0
        for suffix, name in wanted:
            for (file, _, func), (_, _, _, cumulative, _) in table.items():
                if file.endswith(suffix) and (func == name or (suffix == "~" and name in func)):
                    total += cumulative
        out[stage] = total
    return out


def profiled(run) -> tuple[pstats.Stats, float]:
    profile = cProfile.Profile()
    start = time.process_time()
    profile.enable()
    run()
    profile.disable()
    return pstats.Stats(profile), time.process_time() - start


def table(title: str, seconds: dict[str, float], total: float) -> list[str]:
    lines = [f"### {title}", "", f"Total {total:.2f} CPU s (profiled).", "", "| stage | s | share |", "|---|---:|---:|"]
    lines += [f"| {stage} | {s:.3f} | {100 * s / total:.0f}% |" for stage, s in seconds.items()]
    rest = total - sum(seconds.values())
    return lines + [f"| everything else (Python glue, generators, small numpy) | {rest:.3f} | {100 * rest / total:.0f}% |", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", default="bench/results_profile.md")
    ap.add_argument("--workdir", default="bench/out")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    slide = ensure_slide(work / "bench_20480x16384.svs", 20480, 16384, n_tissues=4, seed=11)
    params = sharding.ShardParams(mags=MAGS)
    run_shard(slide, work / "shards", params)  # warm: file cache, gain tables
    shard_stats, shard_total = profiled(lambda: run_shard(slide, work / "shards", params))
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "train-000000.tar"
        write_bench_shard(shard, 200, 256)
        stats = {"mean": [0.5] * 3, "std": [0.25] * 3}
        spec = StreamSpec(urls=[str(shard)], mode="paired", mag=2.5, teacher_mag=10.0,
                          stats={"10x": stats, "2.5x": stats}, micro_batch=1, samples=200, sampler="ordered",
                          augment=AugmentConfig(), finish_on_device=True)
        stream = ShardStream(spec)
        list(stream)
        loader_stats, loader_total = profiled(lambda: [list(stream) for _ in range(3)])
    lines = ["## Stage profiles (`bench/profile_paths.py`)", "", f"Run {time.strftime('%Y-%m-%d')} on {describe()}.",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/profile_paths.py` (VIPS_CONCURRENCY=1).", "",
             *table(f"`hpcdistill shard`, {slide.name} (4 tissues, 87 level-0 Mpix, 5 magnifications)",
                    stage_seconds(shard_stats, SHARD_STAGES), shard_total),
             *table("training loader, 3 passes over 200 pairs (10x 256 px + 2.5x 64 px JPEG), augmented",
                    stage_seconds(loader_stats, LOADER_STAGES), loader_total),
             "Flips/rot90, bucket crops, the colour map and standardisation are not in the loader: they run where the "
             "batch lands (`device_batch.finish_batch`)."]
    publish("\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
