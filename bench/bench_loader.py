"""Loader throughput: our paired pipeline (safe decode + paired augmentation + standardisation) vs bare
WebDataset decode of the same shards.

    OMP_NUM_THREADS=1 python bench/bench_loader.py [--samples 200 --size 256]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from hpcdistill.config import AugmentConfig
from hpcdistill.data import ShardStream, StreamSpec


def jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_bench_shard(path: Path, samples: int, size: int) -> None:
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as sink:
        for i in range(samples):
            hi = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            lo = np.asarray(Image.fromarray(hi).resize((size // 4, size // 4), Image.LANCZOS))
            sink.write({"__key__": f"s{i:05d}", "10x.jpg": jpeg(hi), "2.5x.jpg": jpeg(lo), "cls": b"1",
                        "json": json.dumps({"sizes": {"10x": [size, size], "2.5x": [size // 4] * 2}}).encode()})


def rate(iterable) -> float:
    start, n = time.perf_counter(), 0
    for _ in iterable:
        n += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "train-000000.tar"
        write_bench_shard(shard, args.samples, args.size)
        stats = {"mean": [0.5] * 3, "std": [0.25] * 3}
        spec = StreamSpec(urls=[str(shard)], mode="paired", mag=2.5, teacher_mag=10.0,
                          stats={"10x": stats, "2.5x": stats}, micro_batch=1, samples=args.samples,
                          sampler="ordered", augment=AugmentConfig())
        bare, ours = [], []
        for _ in range(args.rounds):
            bare.append(rate(wds.WebDataset(str(shard), shardshuffle=False).decode("rgb8")))
            ours.append(rate(ShardStream(spec)))
    b, o = max(bare), max(ours)
    print(f"{args.samples} pairs, 10x {args.size}px + 2.5x {args.size // 4}px jpg, 1 process")
    print(f"bare webdataset decode {b:8.1f} samples/s | decode + paired aug {o:8.1f} samples/s | "
          f"ratio {o / b:.3f} (target >= 0.8)")


if __name__ == "__main__":
    main()
