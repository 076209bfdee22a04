"""Loader throughput: the training loader (safe decode + paired augmentation draw + colour maps) and the evaluation
loader (decode only; standardised on the model's device) against bare WebDataset decode (`.decode("rgb8")`) of the
same images, in one process, rounds interleaved so machine noise hits all alike; and the bytes a single pass
(validation, evaluation) reads with N loader workers, each on its own shards or all on every shard.

    OMP_NUM_THREADS=1 python bench/bench_loader.py [--samples 200 --size 256 --rounds 7 --content he --workers 8]

`--content he` (default) renders H&E-like tissue with hpcdistill.synthetic.dataset, which JPEG-decodes about as fast as
real tiles; `--content noise` is uniform noise, slow to decode, so the augmentation's share (and the gap) looks
smaller. Prints the median of the per-round ratios and their range.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import describe, median_spread, publish  # noqa: E402

from hpcdistill.config.schema import AugmentConfig
from hpcdistill.data.streams import ShardStream, StreamSpec
from hpcdistill.shards.sample_format import encode_image
from hpcdistill.shards.writer import append_sample


def tile(content: str, size: int, i: int, rng: np.random.Generator) -> np.ndarray:
    if content == "noise":
        return rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    from hpcdistill.synthetic.scene import make_scene, render_region

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
            append_sample(
                archive,
                f"s{i:05d}",
                [
                    ("10x.jpg", encode_image(hi, "jpg", 90)),
                    ("2.5x.jpg", encode_image(lo, "jpg", 90)),
                    ("cls", b"1"),
                    ("json", meta),
                ],
            )


def rates(make, passes: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process) over `passes` passes of make()."""
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for _ in range(passes):
        for _ in make():
            n += 1
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def only(keys: tuple[str, ...]):
    """Keep the sample fields named (and the key): bare decode of exactly the images a stream reads."""
    return lambda sample: {k: v for k, v in sample.items() if k in keys or k.startswith("__")}


def reading(spec: StreamSpec, workers: int, shared: bool) -> int:
    """Bytes of shard files one single pass opens over `workers` loader workers: each worker reading only its own
    shards (the loader now), or `shared`, every worker reading every shard and keeping its share (before)."""
    import hpcdistill.data.streams as data

    share = data.single_pass_share
    if shared:
        data.single_pass_share = lambda urls, rank, world, worker, n: (urls, 1, 0, False)  # the old path
    try:
        opened: list[str] = []
        real = data.raw_samples
        data.raw_samples = lambda urls: (opened.extend(urls), real(urls))[1]
        stream = ShardStream(spec)
        for w in range(workers):
            for _ in stream._raw_batches(w, workers):
                pass
    finally:
        data.single_pass_share, data.raw_samples = share, real
    return sum(Path(u).stat().st_size for u in opened)


def finish_costs(plain: ShardStream, stained: ShardStream, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds per pair to finish the loose batches of each stream on this CPU (the device step), interleaved."""
    import torch

    from hpcdistill.data.device_batch import finish_batch

    batches = [list(plain), list(stained)]
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for loose, out in zip(batches, times):
            start = time.perf_counter()
            for batch in loose:
                finish_batch(batch, "cpu", torch.float32)
            out.append((time.perf_counter() - start) / len(loose))
    return times


def table(args: argparse.Namespace, runs: dict, streams: dict, finishing: tuple, reads: tuple[int, int]) -> list[str]:
    """The results as markdown lines."""
    now, before = reads
    lines = [
        "## Loader benchmark (`bench/bench_loader.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d')} on {describe()}.",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_loader.py --rounds {args.rounds} --passes "
        f"{args.passes}`. {args.samples} pairs, 10x {args.size} px + 2.5x {args.size // 4} px JPEG "
        f"({args.content}), one process, {args.rounds} interleaved rounds of {args.passes} passes each: median "
        "samples/s, and the median (lowest-highest) of the per-round ratios to bare WebDataset decode "
        '(`.decode("rgb8")`) of the same images.',
        "",
        "| loader | samples/s | vs bare decode |",
        "|---|---:|---:|",
    ]
    targets = {"training loader": 0.85, "training loader, stain jitter": 0.85, "evaluation loader": 0.8}
    what = {
        "training loader": "training loader: decode both images, draw flips/rot90 and the colour map",
        "training loader, stain jitter": "the same with `augment.hed: 0.05` (its (3, 4) stain map drawn too)",
        "evaluation loader": "evaluation loader: decode the model's image",
    }
    shown = set()
    for name, (_, reference) in streams.items():
        med, low, high = median_spread([v / r for v, r in zip(runs[name], runs[reference])])
        if reference not in shown:
            lines.append(f"| {reference} | {statistics.median(runs[reference]):.0f} | 1 |")
            shown.add(reference)
        lines.append(
            f"| {what[name]} | {statistics.median(runs[name]):.0f} | {med:.2f}x ({low:.2f}-{high:.2f}); "
            f"target >= {targets[name]} |"
        )
    plain_ms, stain_ms = (1e3 * statistics.median(v) for v in finishing)
    lines += [
        "",
        "Finishing a pair where it lands (device_batch.finish_batch: flips, stacking, colour map, standardisation), "
        f"on this CPU: {plain_ms:.2f} ms a pair, {stain_ms:.2f} ms with the stain jitter (its log, 3x3 map and exp per "
        f"pixel; {stain_ms / plain_ms:.1f}x). On a GPU both are a few kernels; the loader's workers do neither.",
    ]
    lines += [
        "",
        f"A single pass over {args.workers} shards with {args.workers} workers reads {now / 2**20:.1f} MiB "
        f"(a shard per worker) where every worker reading every shard read {before / 2**20:.1f} MiB: "
        f"{before / now:.1f}x less.",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--passes", type=int, default=5, help="passes over the shard per round (longer rounds: steadier)")
    ap.add_argument("--content", choices=("he", "noise"), default="he")
    ap.add_argument("--workers", type=int, default=8, help="loader workers for the reading comparison")
    ap.add_argument("--markdown", default="bench/results_loader.md", help="where the table goes ('' = nowhere)")
    args = ap.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "train-000000.tar"
        write_bench_shard(shard, args.samples, args.size, args.content)
        stats = {"mean": [0.5] * 3, "std": [0.25] * 3}
        spec = StreamSpec(
            urls=[str(shard)],
            mode="paired",
            mag=2.5,
            teacher_mag=10.0,
            stats={"10x": stats, "2.5x": stats},
            micro_batch=1,
            samples=args.samples,
            sampler="ordered",
            augment=AugmentConfig(),
            finish_on_device=True,
        )
        evaluation = dataclasses.replace(spec, mode="labeled", mag=10.0, augment=None, samples=-1)
        with_stain = dataclasses.replace(spec, augment=AugmentConfig(hed=0.05))
        streams = {
            "training loader": (ShardStream(spec), "bare pair"),
            "training loader, stain jitter": (ShardStream(with_stain), "bare pair"),
            "evaluation loader": (ShardStream(evaluation), "bare 10x"),
        }
        bare = {
            "bare pair": lambda: wds.WebDataset(str(shard), shardshuffle=False).decode("rgb8"),
            "bare 10x": lambda: (
                wds.WebDataset(str(shard), shardshuffle=False).map(only(("10x.jpg", "cls"))).decode("rgb8")
            ),
        }
        runs: dict[str, list[float]] = {name: [] for name in [*bare, *streams]}
        for _ in range(args.rounds):
            for name, make in bare.items():
                runs[name].append(rates(make, args.passes)[0])
            for name, (stream, _) in streams.items():
                runs[name].append(rates(lambda: stream, args.passes)[0])
        finishing = finish_costs(ShardStream(spec), ShardStream(with_stain), args.rounds)
        shards = [Path(tmp) / f"val-{i:06d}.tar" for i in range(args.workers)]
        for path in shards:
            shutil.copyfile(shard, path)
        single = dataclasses.replace(evaluation, urls=[str(p) for p in shards])
        now, before = reading(single, args.workers, False), reading(single, args.workers, True)
    lines = table(args, runs, streams, finishing, (now, before))
    publish("\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
