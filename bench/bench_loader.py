"""Loader throughput: our paired pipeline (safe decode + paired augmentation + standardisation) vs bare
WebDataset decode (`.decode("rgb8")`) of the same shard, in one process, rounds interleaved so machine noise hits
all alike. Target (issue 3): ours >= 0.8x bare.

    OMP_NUM_THREADS=1 python bench/bench_loader.py [--samples 200 --size 256 --rounds 5 --content he]

`--content he` (default) renders H&E-like tissue with hpcdistill.synthetic, which JPEG-decodes about as fast as
real tiles; `--content noise` is uniform noise, slow to decode, so the augmentation's share (and the gap) looks
smaller. Prints the best-round ratio on wall time and on this process's CPU time (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from hpcdistill.config import AugmentConfig
from hpcdistill.data import ShardStream, StreamSpec
from hpcdistill.shard_cut import encode_image
from hpcdistill.shard_writer import append_sample


def tile(content: str, size: int, i: int, rng: np.random.Generator) -> np.ndarray:
    if content == "noise":
        return rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    from hpcdistill.synthetic_tissue import make_scene, render_region

    # 10x of a 40x slide at 0.25 um/px: a 4x downsample of level 0
    scene = make_scene(size * 4, size * 4, mpp=0.25, class_id=i % 3, seed=i, n_tissues=1)
    return render_region(scene, 0, 0, size, size, downsample=4.0)


def write_bench_shard(path: Path, samples: int, size: int, content: str = "he") -> None:
    """One USTAR shard with the sharder's own member writer (as `hpcdistill shard` makes them)."""
    rng = np.random.default_rng(0)
    tiles = [tile(content, size, i, rng) for i in range(min(samples, 16))]  # rendering is slow: reuse a few
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for i in range(samples):
            hi = tiles[i % len(tiles)]
            lo = np.asarray(Image.fromarray(hi).resize((size // 4, size // 4), Image.LANCZOS))
            meta = json.dumps({"sizes": {"10x": [size, size], "2.5x": [size // 4] * 2}}).encode()
            append_sample(archive, f"s{i:05d}", [("10x.jpg", encode_image(hi, "jpg", 90)),
                                                  ("2.5x.jpg", encode_image(lo, "jpg", 90)), ("cls", b"1"),
                                                  ("json", meta)])


def rates(iterable) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process)."""
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for _ in iterable:
        n += 1
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--content", choices=("he", "noise"), default="he")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "train-000000.tar"
        write_bench_shard(shard, args.samples, args.size, args.content)
        stats = {"mean": [0.5] * 3, "std": [0.25] * 3}
        spec = StreamSpec(urls=[str(shard)], mode="paired", mag=2.5, teacher_mag=10.0,
                          stats={"10x": stats, "2.5x": stats}, micro_batch=1, samples=args.samples,
                          sampler="ordered", augment=AugmentConfig())
        streams = {"deferred": ShardStream(dataclasses.replace(spec, defer_colour=True)), "finished": ShardStream(spec)}
        runs: dict[str, list[tuple[float, float]]] = {"bare": [], **{name: [] for name in streams}}
        for _ in range(args.rounds):
            runs["bare"].append(rates(wds.WebDataset(str(shard), shardshuffle=False).decode("rgb8")))
            for name, stream in streams.items():
                runs[name].append(rates(stream))
    print(f"{args.samples} pairs, 10x {args.size}px + 2.5x {args.size // 4}px jpg ({args.content}), 1 process, "
          f"best of {args.rounds} interleaved rounds; samples/s (ratio to bare, target >= 0.8)")
    print("  deferred = what training's loader workers do (decode, flips/rot90, colour maps; the engine applies the")
    print("             maps on its device); finished = colour + standardisation on this CPU too (evaluation)")
    for i, clock in enumerate(("wall", "cpu")):
        best = {name: max(r[i] for r in rs) for name, rs in runs.items()}
        print(f"{clock:4s}: bare webdataset decode {best['bare']:7.1f} | "
              + " | ".join(f"{name} {best[name]:7.1f} (ratio {best[name] / best['bare']:.3f})" for name in streams))


if __name__ == "__main__":
    main()
