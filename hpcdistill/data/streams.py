"""The training and evaluation streams: per-rank/per-worker splitting, sample order, bucketing and batching (reading
tars is shards/reader.py, the augmentation draw augment.py, the per-pixel work where the batch lands device_batch.py).

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

from hpcdistill.common.errors import DataError, HpcdistillError, traceback_line
from hpcdistill.common.mags import mag_name
from hpcdistill.config.schema import AugmentConfig
from hpcdistill.data.augment import AugmentDraw, Standardizer
from hpcdistill.data.device_batch import finish_batch
from hpcdistill.shards.reader import decode_sample, raw_samples, sample_size

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
    # True: yield loader batches (decoded uint8 images, their moves and colour maps; device_batch.py) for
    # finish_batch() where the model runs, so the loader's CPU work stays near bare decoding; False: finished float32
    # images (the loader runs finish_batch on its CPU)
    finish_on_device: bool = False
    # True (data.decode: gpu): yield the JPEG bytes undecoded; finish_batch decodes them on the device
    decode_on_device: bool = False


class ShardStream(torch.utils.data.IterableDataset):
    """Yields micro-batches (dicts of stacked tensors) for one rank; workers take micro-batches round-robin,
    in the order torch's DataLoader fetches them, so the rank sees the same sequence for any num_workers."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        if not spec.urls:
            raise DataError("data: no shards selected for this stream")
        if spec.decode_on_device and not spec.finish_on_device:
            raise ValueError("StreamSpec: decode_on_device needs finish_on_device")
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
            batch = collate([self._make_sample(raw) for raw in group], self.spec)
            yield batch if self.spec.finish_on_device else finish_batch(batch)

    # -- one sample ----------------------------------------------------------------------------------------
    def _make_sample(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Decode (or, decode_on_device, only check) the images and draw the augmentation; nothing per pixel."""
        s = self.spec
        low, high = mag_name(s.mag), mag_name(s.teacher_mag)
        wanted = {"labeled": [low, "cls"], "unlabeled": [low], "paired": [high, low, "cls"]}[s.mode] + ["json"]
        dec = decode_sample(raw, wanted, encoded=s.decode_on_device)
        if s.mode == "labeled" and "cls" not in dec:
            raise DataError(f"{raw.get('__url__', '?')}: sample {dec['__key__']} has no cls label (labeled mode)")
        out: dict[str, Any] = {
            "key": dec["__key__"],
            "slide": dec["json"].get("slide", dec["__key__"]),
            "y": dec.get("cls", -1),
            **_window_of(dec["json"]),
        }
        names = {"x": low, "t": high} if s.mode == "paired" else {"x": low}
        draw = None
        if s.augment is not None:
            rng = random.Random(f"{s.seed}/{s.epoch}/{raw['__draw__']}/{dec['__key__']}/aug")
            draw = AugmentDraw.sample(s.augment, rng)
            out["moves"] = draw.moves
        linear, pivot = draw.colour_linear() if draw is not None else (None, 0.0)
        stains = draw.stain_map() if draw is not None and s.augment.hed > 0 else None  # every sample, or none
        for slot, name in names.items():
            standardizer = self._standardizer(name)
            out[slot] = dec[name]
            if stains is not None:  # one stain move for the whole pair, like the colour map
                out[f"{slot}_hed"] = stains
            if linear is None:
                out[f"{slot}_map"] = standardizer.plain
            else:  # the model image's mean grey pivots contrast for the whole pair: added where the pixels are
                out[f"{slot}_map"] = standardizer.map(linear)
                out[f"{slot}_pivot"] = standardizer.pivot(pivot)
        return out


def single_pass_share(
    urls: list[str], rank: int, world: int, worker: int, workers: int
) -> tuple[list[str], int, int, bool]:
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


def _window_of(meta: dict[str, Any]) -> dict[str, Any]:
    """Which tissue of its slide a sample is, and its level-0 area: what slide and patient calls weigh it by."""
    box = meta.get("box_l0") or [0, 0, 1, 1]
    return {"tissue": int(meta.get("tissue", 0)), "area": float(box[2]) * float(box[3])}


def collate(samples: list[dict[str, Any]], spec: StreamSpec) -> dict[str, Any]:
    """A loader batch (device_batch.py): images stay per sample, since rotations and bucket crops happen where the
    batch lands; the small per-sample arrays are stacked."""
    batch: dict[str, Any] = {
        "key": [s["key"] for s in samples],
        "slide": [s["slide"] for s in samples],
        "tissue": [s["tissue"] for s in samples],
        "area": [s["area"] for s in samples],
        "y": torch.from_numpy(np.array([s["y"] for s in samples], np.int64)),
        "encoded": spec.decode_on_device,
        "crop": spec.bucketed,
    }
    for name in samples[0]:
        if name in ("x", "t"):
            batch[name] = [s[name] for s in samples]
        elif name.endswith(("_map", "_pivot", "_hed")) or name == "moves":
            parts = [np.asarray(s[name]) for s in samples]
            batch[name] = torch.from_numpy(parts[0][None] if len(parts) == 1 else np.stack(parts))
    return batch


def leave_requeue_to_main_process(worker_id: int) -> None:
    """SLURM sends the time-limit signal (SIGUSR2) to every process of the step, and forked workers inherit the
    main process's submitit handler: without this each worker would also dump the job and call `scontrol requeue`."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    # and Ctrl-C, which the terminal sends to every process: the main process ends the run in one line. SIGTERM stays
    # default: the DataLoader stops a worker that does not exit with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
        ShardStream(spec),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
        worker_init_fn=leave_requeue_to_main_process if num_workers else None,
    )
