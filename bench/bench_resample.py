"""Lanczos3 precision and cost per shrink: the sharder's resampling against vips' own and against PIL.

On a 4096x4096 level-0 crop of the sharding benchmark's synthetic 40x slide (decoded once, as `shard` does), for
each shrink of the default magnifications (4 .. 64), one thread:
  vips 8-bit      `reduce` lanczos3 (what bare pyvips gives; darker: its integer masks sum to < 1)
  float pass 2    the previous precise path: vips 8-bit reducev, then reduceh in float, the first-pass gain divided
                  out before one rounding
  shard           `resample.lanczos_to_size` (8-bit reducev, then the exact integer-weight GEMM pass)
  PIL             Image.resize(LANCZOS) on the same pixels: the precision reference (its time for scale)
Time: median ms of interleaved rounds. Precision against PIL, borders (3 px) left out: bias / mean abs / p99 abs
in grey levels.

  .venv/bin/python bench/bench_resample.py [--rounds 5] [--markdown bench/results_resample.md]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VIPS_CONCURRENCY", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pyvips  # noqa: E402
from PIL import Image  # noqa: E402

from hpcdistill.shards import sharding
from hpcdistill.slides import resample  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import describe, publish  # noqa: E402
from bench_shard import ensure_slide, tissue_regions  # noqa: E402

SHRINKS = (4, 8, 16, 32, 64)
SIDE = 4096


def vips_8bit(region: pyvips.Image, size: tuple[int, int]) -> np.ndarray:
    return region.reduce(region.width / size[0], region.height / size[1], kernel="lanczos3").numpy()


def float_second_pass(region: pyvips.Image, size: tuple[int, int]) -> np.ndarray:
    """The precise path before the GEMM: 8-bit reducev, tile cache, float reduceh, gain divided out, rint."""
    vshrink, hshrink = region.height / size[1], region.width / size[0]
    gain = resample._reducev_gain(region.height, vshrink)
    image = region.reducev(vshrink, kernel="lanczos3")
    image = image.tilecache(
        tile_width=512, tile_height=32, max_tiles=5 * (math.ceil(image.width / 512) + 1), threaded=True
    )
    image = image.cast("float").reduceh(hshrink, kernel="lanczos3")
    image = image * pyvips.Image.new_from_array((1.0 / gain)[:, None]).replicate(image.width, 1)
    return image.rint().cast("uchar").numpy()


def shard_path(region: pyvips.Image, size: tuple[int, int]) -> np.ndarray:
    return resample.lanczos_to_size(region, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench/out")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", default="bench/results_resample.md")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    slide = ensure_slide(work / "bench_20480x16384.svs", 20480, 16384, n_tissues=4, seed=11)
    x, y, w, h = max(tissue_regions(slide, sharding.ShardParams()), key=lambda box: box[2] * box[3])
    left, top = x + max(0, (w - SIDE) // 2), y + max(0, (h - SIDE) // 2)
    region = resample.decoded(pyvips.Image.new_from_file(str(slide)).crop(left, top, SIDE, SIDE))  # as `shard`
    pixels = region.numpy()
    print(describe())
    pipelines = {
        "vips 8-bit": vips_8bit,
        "float pass 2": float_second_pass,
        "shard": shard_path,
        "PIL": lambda _, size: np.asarray(Image.fromarray(pixels).resize(size, Image.LANCZOS)),
    }
    rows = []
    for shrink in SHRINKS:
        size = (SIDE // shrink, SIDE // shrink)
        times: dict[str, list[float]] = {name: [] for name in pipelines}
        outputs: dict[str, np.ndarray] = {}
        for _ in range(args.rounds):  # interleaved: machine noise hits every pipeline alike
            for name, run in pipelines.items():
                start = time.perf_counter()
                outputs[name] = run(region, size)
                times[name].append(time.perf_counter() - start)
        reference = outputs["PIL"].astype(int)
        cells = []
        for name in pipelines:
            ms = 1e3 * statistics.median(times[name])
            if name == "PIL":
                cells.append(f"{ms:.0f} ms")
                continue
            diff = (outputs[name].astype(int) - reference)[3:-3, 3:-3]
            cells.append(
                f"{ms:.0f} ms, {diff.mean():+.2f} / {np.abs(diff).mean():.2f} / {np.quantile(np.abs(diff), 0.99):.0f}"
            )
        rows.append(f"| {shrink} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    publish(
        "\n".join(
            [
                "## Lanczos3 precision and cost (`bench/bench_resample.py`)",
                "",
                f"Run {time.strftime('%Y-%m-%d')} on {describe()}.",
                f"Command: `.venv/bin/python bench/bench_resample.py --rounds {args.rounds}` (one thread; "
                f"{SIDE}x{SIDE} level-0 crop of {slide.name}; median of {args.rounds} interleaved rounds).",
                "Each cell: time, then against PIL LANCZOS on the same pixels bias / mean abs / p99 abs (grey levels).",
                "",
                "| shrink | " + " | ".join(pipelines) + " |",
                "|---:|" + "---|" * len(pipelines),
                *rows,
                "",
            ]
        ),
        args.markdown,
    )


if __name__ == "__main__":
    main()
