"""The training and evaluation streams: per-rank/per-worker splitting, sample order, bucketing and batching (reading
tars is shard_reader.py, the per-image transforms augment.py).

One stream per rank yields micro-batches. Its length is fixed in advance (`per_rank_samples`), so every rank runs
the same number of steps per epoch however unevenly the shards are sized: a rank that runs dry would otherwise hang
the others in the gradient all-reduce. Two samplers:

* "resampled": each (rank, worker) draws shards with replacement from a seeded RNG and streams them through a
  shuffle buffer. Every rank reads only its own shards; this is the one for real runs.
* "ordered": a single global sample order (the shards in listed order, cycled), strided across ranks (global sample
  i goes to rank i % world). Optimizer step s then sees global samples [s*A*W, (s+1)*A*W) for any world size W,
  which makes a 2-rank run comparable to a 1-rank run; every rank reads all shards, so it costs W times the I/O.

Validation and evaluation use the ordered stream without cycling: every sample exactly once, each shard read by one
(rank, worker) where there are at least as many shards (`single_pass_share`).

Augmentation draws come from a generator seeded by (seed, epoch, the sample's position in the global order, or in
the rank's and worker's stream when resampled), never from global state, so skipping samples on resume reproduces
the rest of the epoch exactly. The same draw (flips, rot90, one colour map) goes to both images of a KD pair.
"""

from __future__ import annotations

import math
import random
import signal
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import torch

from hpcdistill.augment import AugmentDraw, Standardizer, finish_batch, uint8_planes
from hpcdistill.config import AugmentConfig
from hpcdistill.errors import DataError, HpcdistillError, traceback_line
from hpcdistill.mags import mag_name
from hpcdistill.shard_reader import decode_sample, raw_samples, sample_size

DataMode = Literal["labeled", "unlabeled", "paired"]


def per_rank_samples(total: int, world: int, unit: int) -> int:
    """Samples each rank runs per epoch: ceil(total/world), rounded down to whole optimizer steps (>= 1 step)."""
    per_rank = math.ceil(total / world)
    return max(unit, per_rank // unit * unit)


@dataclass
class StreamSpec:
    """Everything a rank's stream needs; picklable so DataLoader workers can rebuild it."""

    urls: list[str]
    mode: DataMode
    mag: float  # the (student) image's magnification
    teacher_mag: float
    stats: dict[str, dict[str, list[float]]]  # mag name -> {"mean", "std"}
    micro_batch: int
    samples: int  # samples this rank yields this epoch; -1 = all its samples once (validation)
    rank: int = 0
    world: int = 1
    seed: int = 0
    epoch: int = 0
    sampler: Literal["resampled", "ordered"] = "ordered"
    augment: AugmentConfig | None = None  # None = no augmentation (validation)
    shuffle_buffer: int = 0
    bucketed: bool = False
    bucket_window: int = 8
    start_batch: int = 0  # micro-batches already consumed this epoch (resume)
    # True: yield uint8 NCHW images plus per-image colour maps ("x_map", "t_map") for finish_batch() on the device, so
    # the loader's CPU work stays near bare decoding; False: finished float32 images (the loader runs finish_batch)
    defer_colour: bool = False


class ShardStream(torch.utils.data.IterableDataset):
    """Yields micro-batches (dicts of stacked tensors) for one rank; workers take micro-batches round-robin,
    in the order torch's DataLoader fetches them, so the rank sees the same sequence for any num_workers."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        if not spec.urls:
            raise DataError("data: no shards selected for this stream")
        self.spec = spec
        self._standardizers: dict[str, Standardizer] = {}

    def _standardizer(self, name: str) -> Standardizer:
        if name not in self._standardizers:
            self._standardizers[name] = Standardizer(self.spec.stats[name])
        return self._standardizers[name]

    # -- sample order ------------------------------------------------------------------------------------
    def _ordered(self, urls: list[str], world: int, rank: int) -> Iterator[dict[str, Any]]:
        """Global order over `urls` strided across ranks: rank-local index k <-> global sample k*world + rank."""
        s = self.spec
        cycle = s.samples >= 0
        local = 0
        while True:
            emitted_this_pass = False
            for i, raw in enumerate(raw_samples(urls)):
                if i % world != rank:
                    continue
                emitted_this_pass = True
                if s.samples >= 0 and local >= s.samples:
                    return
                raw["__pos__"] = local
                raw["__draw__"] = str(local * world + rank)  # the global index: world-size invariant
                local += 1
                yield raw
            if not cycle or not emitted_this_pass:
                return

    def _resampled(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        """Shards drawn with replacement per (rank, worker); a seeded shuffle buffer over their samples."""
        s = self.spec
        rng = random.Random(f"{s.seed}/{s.epoch}/{s.rank}/{worker}/shards")
        buffer: list[dict[str, Any]] = []
        local = 0

        def draws() -> Iterator[dict[str, Any]]:
            while True:
                yield from raw_samples([s.urls[rng.randrange(len(s.urls))]])

        for raw in draws():
            buffer.append(raw)
            if len(buffer) < max(1, s.shuffle_buffer):
                continue
            out = buffer.pop(rng.randrange(len(buffer)))
            out["__pos__"] = local
            out["__draw__"] = f"{s.rank}:{worker}:{local}"
            local += 1
            yield out

    # -- batching ----------------------------------------------------------------------------------------
    def _raw_batches(self, worker: int, workers: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """(rank-local micro-batch index, raw samples) for this worker, skipping those consumed before a resume."""
        s = self.spec
        if s.sampler == "resampled" and s.samples >= 0:
            # each worker streams its own shards: it needs exactly its share of the rank's micro-batches
            total_batches = s.samples // s.micro_batch
            mine = [j for j in range(total_batches) if j % workers == worker]
            source = self._resampled(worker, workers)
            groups = _chunks(source, s.micro_batch, drop_last=True)
            pairs = zip(mine, self._bucket_iter(g for _, g in zip(mine, groups)))
        elif s.samples < 0:  # one pass (validation, evaluation): each shard is read by one (rank, worker) if it can
            urls, world, rank, own = single_pass_share(s.urls, s.rank, s.world, worker, workers)
            groups = _chunks(self._ordered(urls, world, rank), s.micro_batch, drop_last=False)
            pairs = ((j, g) for j, g in enumerate(self._bucket_iter(groups)) if own or j % workers == worker)
        else:
            groups = _chunks(self._ordered(s.urls, s.world, s.rank), s.micro_batch, drop_last=True)
            pairs = ((j, g) for j, g in enumerate(self._bucket_iter(groups)) if j % workers == worker)
        for j, group in pairs:
            if j >= s.start_batch:
                yield j, group

    def _bucket_iter(self, groups: Iterator[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
        """Bucketed mode: sort `bucket_window` micro-batches' worth of samples by size, regroup neighbours."""
        s = self.spec
        if not s.bucketed or s.micro_batch == 1:
            yield from groups
            return
        key = mag_name(s.mag)
        while True:
            window = [g for _, g in zip(range(s.bucket_window), groups)]
            if not window:
                return
            flat = sorted((x for g in window for x in g), key=lambda r: (math.prod(sample_size(r, key)), r["__pos__"]))
            sizes = [len(g) for g in window]
            at = 0
            for n in sizes:
                yield flat[at : at + n]
                at += n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for _, group in self._raw_batches(worker, workers):
            batch = collate([self._make_sample(raw) for raw in group], self.spec.bucketed)
            yield batch if self.spec.defer_colour else finish_batch(batch)

    # -- one sample ----------------------------------------------------------------------------------------
    def _make_sample(self, raw: dict[str, Any]) -> dict[str, Any]:
        s = self.spec
        low, high = mag_name(s.mag), mag_name(s.teacher_mag)
        wanted = {"labeled": [low, "cls"], "unlabeled": [low], "paired": [high, low, "cls"]}[s.mode] + ["json"]
        dec = decode_sample(raw, wanted)
        if s.mode == "labeled" and "cls" not in dec:
            raise DataError(f"{raw.get('__url__', '?')}: sample {dec['__key__']} has no cls label (labeled mode)")
        names = {"x": low, "t": high} if s.mode == "paired" else {"x": low}
        images = {slot: dec[name] for slot, name in names.items()}
        if s.augment is not None:
            rng = random.Random(f"{s.seed}/{s.epoch}/{raw['__draw__']}/{dec['__key__']}/aug")
            draw = AugmentDraw.sample(s.augment, rng)
            images = {slot: draw.geometry(img) for slot, img in images.items()}
        pixels = {slot: uint8_planes(img) for slot, img in images.items()}
        jitter = None
        if s.augment is not None:
            # the model image's channel means fix the contrast pivot for the whole pair: one colour map for both
            jitter = draw.colour(pixels["x"].numpy().reshape(3, -1).mean(1) / 255.0)
        out: dict[str, Any] = {"key": dec["__key__"], "slide": dec["json"].get("slide", dec["__key__"]),
                               "y": dec.get("cls", -1)}
        for slot, name in names.items():
            standardizer = self._standardizer(name)
            out[f"{slot}_map"] = standardizer.plain if jitter is None else standardizer.map(*jitter)
            out[slot] = pixels[slot]
        return out


def single_pass_share(urls: list[str], rank: int, world: int, worker: int,
                      workers: int) -> tuple[list[str], int, int, bool]:
    """What one (rank, worker) reads in a single pass over `urls`, every sample exactly once: (shards, stride, offset,
    own). With at least as many shards as ranks, each rank reads only its own shards (urls[rank::world]); otherwise
    every rank reads them all and keeps every world-th sample. Then with at least as many of those shards as workers,
    each worker reads only its own (own=True); otherwise every worker reads them all and keeps every workers-th
    micro-batch. Shards are read once where there are enough of them, instead of once per worker and rank."""
    stride, offset = world, rank
    if len(urls) >= world:
        urls, stride, offset = urls[rank::world], 1, 0
    if stride == 1 and len(urls) >= workers:
        return urls[worker::workers], 1, 0, True
    return urls, stride, offset, False


def _chunks(items: Iterator[Any], n: int, drop_last: bool) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk and not drop_last:
        yield chunk


def center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


def collate(samples: list[dict[str, Any]], crop: bool) -> dict[str, Any]:
    """Stack a micro-batch of uint8 (3, H, W) images and their colour maps. With `crop` (bucketed mode) every image is
    centre-cropped to the batch's smallest size; the teacher crop is the student crop scaled by the magnification
    ratio, so pairs stay aligned."""
    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "slide": [s["slide"] for s in samples],
                             "y": torch.tensor([s["y"] for s in samples])}
    xs = [s["x"] for s in samples]
    if crop and len(samples) > 1:
        h = min(x.shape[-2] for x in xs)
        w = min(x.shape[-1] for x in xs)
        xs = [center_crop(x, h, w) for x in xs]
        if "t" in samples[0]:
            ratios = [(s["t"].shape[-2] / s["x"].shape[-2], s["t"].shape[-1] / s["x"].shape[-1]) for s in samples]
            th = min(round(h * r[0]) for r in ratios)
            tw = min(round(w * r[1]) for r in ratios)
            for s in samples:
                s["t"] = center_crop(s["t"], th, tw)
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise DataError(f"data: micro-batch of {len(xs)} has different image sizes {sorted(shapes)}; "
                        "use train.micro_batch=1 for whole tissues or train.bucketed=true")
    if len(samples) == 1:  # micro-batch 1 (whole tissues): views, no copies
        batch["x"] = xs[0][None]
        if "t" in samples[0]:
            batch["t"] = samples[0]["t"][None]
    else:
        batch["x"] = torch.stack(xs)
        if "t" in samples[0]:
            batch["t"] = torch.stack([s["t"] for s in samples])
    for name in ("x_map", "t_map"):
        if name in samples[0]:
            batch[name] = torch.from_numpy(np.stack([s[name] for s in samples]))
    return batch


def leave_requeue_to_main_process(worker_id: int) -> None:
    """SLURM sends the time-limit signal (SIGUSR2) to every process of the step, and forked workers inherit the
    main process's submitit handler: without this each worker would also dump the job and call `scontrol requeue`."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class ShardLoader(torch.utils.data.DataLoader):
    """A DataLoader whose errors stay one line, whichever process (main or worker) raised them."""

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        batches = super().__iter__()
        try:
            yield from batches
        except HpcdistillError as err:
            raise type(err)(traceback_line(str(err), keep_type=False, limit=None)) from None


def make_loader(spec: StreamSpec, num_workers: int = 0, pin_memory: bool = False) -> ShardLoader:
    """batch_size=None: the stream batches itself (per-worker split, bucketing); the loader only adds workers.
    pin_memory (for a GPU): page-locked batches, so finish_batch's non_blocking copies really overlap."""
    return ShardLoader(
        ShardStream(spec), batch_size=None, num_workers=num_workers, persistent_workers=False, pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
        worker_init_fn=leave_requeue_to_main_process if num_workers else None,
    )
