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

from hpcdistill.config.schema import AugmentConfig  # noqa: E402
from hpcdistill.data.streams import ShardStream, StreamSpec  # noqa: E402
from hpcdistill.shards import sharding  # noqa: E402


class Seconds:
    """Cumulative CPU seconds out of a cProfile table: of a Python function (file suffix, name), of a C function
    (part of its name), or of a Python function in its calls from one caller."""

    def __init__(self, stats: pstats.Stats):
        self.table = stats.stats  # type: ignore[attr-defined]

    def of(self, suffix: str, name: str) -> float:
        return sum(row[3] for (file, _, func), row in self.table.items() if file.endswith(suffix) and func == name)

    def c_call(self, part: str) -> float:
        return sum(row[3] for (file, _, func), row in self.table.items() if file == "~" and part in func)

    def called(self, suffix: str, name: str, caller: str) -> float:
        """Cumulative seconds of a Python function in its calls from `caller` only."""
        return sum(
            ct
            for (file, _, func), row in self.table.items()
            if file.endswith(suffix) and func == name
            for (_, _, by), (_, _, _, ct) in row[4].items()
            if by == caller
        )


def shard_stages(t: Seconds) -> dict[str, float]:
    first_pass = t.called("vimage.py", "write_to_memory", "_horizontal_gemm")
    return {
        "level-0 decode (JPEG tiles into memory)": t.called("vimage.py", "write_to_memory", "resample_together"),
        "Lanczos3 first pass (vips 8-bit reducev, every magnification)": first_pass,
        "Lanczos3 second pass (exact integer-weight GEMM, gain, rounding)": t.of("resample.py", "_horizontal_gemm")
        - first_pass,
        "Lanczos3 tap weights (per block and magnification)": t.of("resample.py", "_horizontal_plan"),
        "vips operation set-up (masks, pipelines)": t.c_call("vips_cache_operation_build"),
        "thumbnail": t.of("slide.py", "thumbnail"),
        "tissue finding": t.of("tissue.py", "find_tissues"),
        "QC PNG": t.of("tissue.py", "write_qc_png"),
        "JPEG encode": t.of("sample_format.py", "encode_image"),
        "tar write (members, fsync, rename)": t.of("writer.py", "add") + t.of("writer.py", "commit"),
        "colour statistics for the manifest (labeled train slides; none here)": t.of("cut.py", "_add_pixel_sums"),
    }


def loader_stages(t: Seconds) -> dict[str, float]:
    return {
        "tar read (members, grouping)": t.of("reader.py", "raw_samples"),
        "JPEG decode (libjpeg-turbo)": t.c_call("'decode' of 'ImagingDecoder'"),
        "JPEG header parse (PIL open)": t.of("Image.py", "open"),
        "pixel copy out of PIL (tobytes)": t.of("Image.py", "tobytes"),
        "augmentation draw (flips, rot90, colour map)": sum(
            t.of("augment.py", name) for name in ("sample", "colour_linear", "map", "pivot")
        ),
        "collate (per-sample arrays into a batch)": t.of("streams.py", "collate"),
    }


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
    return lines + [
        f"| everything else (Python glue, generators, small numpy) | {rest:.3f} | {100 * rest / total:.0f}% |",
        "",
    ]


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
        spec = StreamSpec(
            urls=[str(shard)],
            mode="paired",
            mag=2.5,
            teacher_mag=10.0,
            stats={"10x": stats, "2.5x": stats},
            micro_batch=1,
            samples=200,
            sampler="ordered",
            augment=AugmentConfig(),
            finish_on_device=True,
        )
        stream = ShardStream(spec)
        list(stream)
        loader_stats, loader_total = profiled(lambda: [list(stream) for _ in range(3)])
    lines = [
        "## Stage profiles (`bench/profile_paths.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d')} on {describe()}.",
        "Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/profile_paths.py` (VIPS_CONCURRENCY=1).",
        "",
        *table(
            f"`hpcdistill shard`, {slide.name} (4 tissues, 87 level-0 Mpix, 5 magnifications)",
            shard_stages(Seconds(shard_stats)),
            shard_total,
        ),
        *table(
            "training loader, 3 passes over 200 pairs (10x 256 px + 2.5x 64 px JPEG), augmented",
            loader_stages(Seconds(loader_stats)),
            loader_total,
        ),
        "Flips/rot90, bucket crops, the colour map and standardisation are not in the loader: they run where the "
        "batch lands (`device_batch.finish_batch`).",
    ]
    publish("\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
