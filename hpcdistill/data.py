"""WebDataset input pipelines: per-rank/per-worker splitting, safe decoding, paired augmentation, batching.

One stream per rank yields micro-batches. Its length is fixed in advance (`per_rank_samples`), so every rank runs
the same number of steps per epoch however unevenly the shards are sized: a rank that runs dry would otherwise hang
the others in the gradient all-reduce. Two samplers:

* "resampled": each (rank, worker) draws shards with replacement from a seeded RNG and streams them through a
  shuffle buffer. Every rank reads only its own shards; this is the one for real runs.
* "ordered": a single global sample order (the shards in listed order, cycled), strided across ranks (global sample
  i goes to rank i % world). Optimizer step s then sees global samples [s*A*W, (s+1)*A*W) for any world size W,
  which makes a 2-rank run comparable to a 1-rank run; every rank reads all shards, so it costs W times the I/O.

Validation uses the ordered stream without cycling: every sample exactly once, split across ranks.

Augmentation draws come from a generator seeded by (seed, epoch, the sample's position in the global order, or in
the rank's and worker's stream when resampled), never from global state, so skipping samples on resume reproduces
the rest of the epoch exactly. The same draw (flips, rot90, one colour map) goes to both images of a KD pair.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import signal
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener
from braceexpand import braceexpand

from hpcdistill.config import AugmentConfig
from hpcdistill.errors import HpcdistillError
from hpcdistill.mags import mag_name

DataMode = Literal["labeled", "unlabeled", "paired"]
IMAGE_EXTS = ("jpg", "png")


class DataError(HpcdistillError):
    """Missing shards, a bad manifest, or a sample lacking what the mode needs."""


# ---------------------------------------------------------------------------------------------- shards


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    path = Path(shards_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise DataError(f"{path}: manifest not found (run `hpcdistill shard` first)") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None


def manifest_digest(shards_dir: str | Path) -> str | None:
    """sha256 of manifest.json: the identity of a shard folder wherever it is copied (None: unreadable)."""
    try:
        return hashlib.sha256((Path(shards_dir) / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]  # concrete shard paths/URLs in a fixed order
    samples: int  # total samples in them

    @staticmethod
    def combine(sets: list[ShardSet]) -> ShardSet:
        """Several sets read together, in the given order."""
        return ShardSet([u for s in sets for u in s.urls], sum(s.samples for s in sets))


def resolve_sets(shards_dir: str | Path, manifest: dict[str, Any], entries: list[str]) -> ShardSet:
    """Split names ("train", "aux1") via the manifest; anything else is a brace pattern, relative to shards_dir."""
    urls: list[str] = []
    samples = 0
    splits = manifest.get("splits", {})
    for entry in entries:
        if entry in splits:
            info = splits[entry]
            urls += [str(Path(shards_dir) / name) for name in info.get("shards", [])]
            samples += int(info.get("samples", 0))
            continue
        expanded = [u if "://" in u or Path(u).is_absolute() else str(Path(shards_dir) / u) for u in braceexpand(entry)]
        for url in expanded:
            if "://" not in url and not Path(url).exists():
                raise DataError(f"{url}: shard not found (from set entry {entry!r}; known splits: {', '.join(splits)})")
            samples += count_samples(url)
        urls += expanded
    return ShardSet(urls, samples)


def split_summary(manifest: dict[str, Any]) -> str:
    """'train (60), val (30), ...': the manifest's splits and their sample counts, for error messages."""
    return ", ".join(f"{k} ({v.get('samples', 0)})" for k, v in manifest.get("splits", {}).items()) or "none"


def count_samples(url: str) -> int:
    """Distinct keys in a local tar, from its headers only (tarfile seeks past the data)."""
    if "://" in url:
        raise DataError(f"{url}: remote shards must be named by split in the manifest (their counts come from it)")
    check_tar_end(url, None)
    keys = set()
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile():
                    keys.add(member.name.split("/")[-1].split(".", 1)[0])
    except (tarfile.TarError, OSError, EOFError) as err:
        raise _shard_error(url, err, None) from None
    return len(keys)


def per_rank_samples(total: int, world: int, unit: int) -> int:
    """Samples each rank runs per epoch: ceil(total/world), rounded down to whole optimizer steps (>= 1 step)."""
    per_rank = math.ceil(total / world)
    return max(unit, per_rank // unit * unit)


TAR_END = 1024  # a tar ends with two 512-byte zero blocks: a file cut anywhere, even between members, lacks them


def _shard_error(url: str, err: BaseException | str, last_key: str | None) -> DataError:
    reason = err
    if not isinstance(err, str):  # webdataset appends the stream and url to the exception's args
        first = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
        reason = " ".join(first.split(" @ <")[0].split()) or type(err).__name__
    return DataError(f"{url}: truncated or corrupt shard ({reason}); last good sample: {last_key or 'none'}. "
                     "Restore the file, or shard the slides again into a new folder")


def check_tar_end(url: str, last_key: str | None) -> None:
    """Refuse a local tar without its end-of-archive blocks. tarfile's stream reader ends quietly when a file is
    cut exactly between members, so without this check a truncated shard would read as a shorter one."""
    if "://" in url:
        return  # a remote stream has no size to check; its reader still fails on a cut inside a member
    try:
        size = os.path.getsize(url)
        with open(url, "rb") as handle:
            handle.seek(max(0, size - TAR_END))
            tail = handle.read(TAR_END)
    except OSError as err:
        raise DataError(f"{url}: cannot read shard ({err.strerror or err})") from None
    if size < TAR_END or size % 512 or tail.count(0) != TAR_END:
        raise _shard_error(url, f"{size} bytes, no end-of-archive marker", last_key)


def _raw_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Undecoded samples (bytes per extension) from tars, in order; a truncated or corrupt tar raises a DataError
    naming it and its last good sample."""
    for url in urls:
        if "://" not in url and not os.path.isfile(url):
            raise DataError(f"{url}: shard not found")
        last_key, held = None, None
        try:
            for sample in group_by_keys(tar_file_expander(url_opener([{"url": url}]))):
                if held is not None:
                    yield held
                    last_key = held["__key__"]
                held = sample
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            raise _shard_error(url, err, last_key) from None
        check_tar_end(url, last_key)  # before the last sample: a cut between its members leaves it incomplete
        if held is not None:
            yield held


# ---------------------------------------------------------------------------------------------- decoding


def decode_image(blob: bytes) -> Image.Image:
    """A decoded RGB image (PIL: flips, rotations and channel splits stay in fast uint8 C code)."""
    img = Image.open(io.BytesIO(blob))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_sample(raw: dict[str, Any], wanted: list[str]) -> dict[str, Any]:
    """Decode only what is asked for: images as RGB PIL images, 'cls' as int, 'json' as a dict. Never unpickles.
    A payload that does not decode is a DataError naming the shard, the sample and the payload."""
    key = raw.get("__key__", "?")
    out: dict[str, Any] = {"__key__": key}
    for name in wanted:
        try:
            if name == "cls":
                if "cls" in raw:
                    out["cls"] = int(raw["cls"].decode("ascii").strip())
                continue
            if name == "json":
                out["json"] = json.loads(raw["json"]) if "json" in raw else {}
                continue
            blob = next((raw[f"{name}.{ext}"] for ext in IMAGE_EXTS if f"{name}.{ext}" in raw), None)
            if blob is None:
                have = sorted(k for k in raw if not k.startswith("__"))
                raise DataError(f"{raw.get('__url__', '?')}: sample {key} has no {name} image (has {', '.join(have)})")
            out[name] = decode_image(blob)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 -- PIL and the codecs raise many types for corrupt bytes
            raise DataError(f"{raw.get('__url__', '?')}: sample {key}: its {name} cannot be decoded "
                            f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); the shard is corrupt") from None
    return out


def _sample_size(raw: dict[str, Any], mag: str) -> tuple[int, int]:
    """(w, h) at `mag` from the json metadata, without decoding the image (for size bucketing)."""
    try:
        w, h = json.loads(raw["json"])["sizes"][mag]
        return int(w), int(h)
    except (KeyError, ValueError, TypeError):
        return 0, 0


# ---------------------------------------------------------------------------------------------- augmentation
#
# Throughput (bench/bench_loader.py): geometry is one PIL transpose of the uint8 image, and all of the colour
# jitter plus standardisation is ONE affine map of RGB (brightness, contrast, saturation and a YIQ hue rotation
# are each affine, so is their composition) and one clamp: a (3, 6) array per image, applied by finish_batch with
# one batched matmul, in the loader (defer_colour=False) or on the training device (the engine).


def _dihedral_ops() -> dict[tuple[bool, bool, int], Image.Transpose | None]:
    """(hflip, vflip, rot90 k) -> the one PIL transpose doing all three (flip left-right, then top-bottom, then
    np.rot90 k times, counter-clockwise); found by probing, so the table cannot disagree with the numpy meaning."""
    probe = np.arange(6, dtype=np.uint8).reshape(2, 3)
    ops: list[Image.Transpose | None] = [None, *Image.Transpose]
    table = {}
    for hflip in (False, True):
        for vflip in (False, True):
            for k in range(4):
                want = np.rot90(probe[:: -1 if vflip else 1, :: -1 if hflip else 1], k)
                for op in ops:
                    got = probe if op is None else np.asarray(Image.fromarray(probe).transpose(op))
                    if got.shape == want.shape and np.array_equal(got, want):
                        table[(hflip, vflip, k)] = op
                        break
    return table


_DIHEDRAL = _dihedral_ops()
_GREY = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL's "L"
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
# H0, H1, H2 (hue rotation = H0 + cos H1 + sin H2 in RGB) and 1 g^T (x -> grey(x) in every channel)
_COLOUR_BASIS = np.stack([_YIQ_TO_RGB @ np.diag([1.0, 0.0, 0.0]) @ _RGB_TO_YIQ,
                          _YIQ_TO_RGB @ np.diag([0.0, 1.0, 1.0]) @ _RGB_TO_YIQ,
                          _YIQ_TO_RGB @ np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]) @ _RGB_TO_YIQ,
                          np.outer(np.ones(3), _GREY)]).reshape(4, 9)


@dataclass(frozen=True)
class AugmentDraw:
    """One random draw, applied identically to every image of a sample (the KD pair)."""

    hflip: bool
    vflip: bool
    rot90: int
    brightness: float
    contrast: float
    saturation: float
    hue: float

    @staticmethod
    def sample(aug: AugmentConfig, rng: random.Random) -> AugmentDraw:
        jitter = lambda s: rng.uniform(1 - s, 1 + s) if s > 0 else 1.0  # noqa: E731
        return AugmentDraw(
            hflip=aug.flips and rng.random() < 0.5,
            vflip=aug.flips and rng.random() < 0.5,
            rot90=rng.randrange(4) if aug.rot90 else 0,
            brightness=jitter(aug.brightness),
            contrast=jitter(aug.contrast),
            saturation=jitter(aug.saturation),
            hue=rng.uniform(-aug.hue, aug.hue) if aug.hue > 0 else 0.0,
        )

    def geometry(self, img: Image.Image) -> Image.Image:
        """Flips then rotation: exact pixel moves, the same k on both images keeps non-square pairs consistent."""
        op = _DIHEDRAL[(self.hflip, self.vflip, self.rot90)]
        return img if op is None else img.transpose(op)

    def colour(self, mean_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) with jittered = A @ rgb + b on [0, 1]: brightness, contrast, saturation, hue in that order.
        Contrast pulls towards the mean grey of the image whose channel means are `mean_rgb`; the caller passes
        the same means for both images of a pair, so both get exactly the same map. Clamping to [0, 1] happens
        once, after the whole map (per-step clamps would differ only for pixels pushed out of range midway)."""
        # brightness x -> B x; contrast x -> C x + (1 - C) * grey(B mean); saturation S = s I + (1 - s) 1 g^T;
        # hue H = a rotation of the YIQ chroma plane (luminance kept; ~10x cheaper than an HSV round trip).
        # H 1 = S 1 = 1 and H 1 g^T = 1 g^T, so A = C B (s H + (1 - s) 1 g^T), H = H0 + cos H1 + sin H2, b ~ 1.
        turn = 2 * math.pi * self.hue
        scale = self.contrast * self.brightness
        coef = np.array([scale * self.saturation, scale * self.saturation * math.cos(turn),
                         scale * self.saturation * math.sin(turn), scale * (1 - self.saturation)])
        offset = (1 - self.contrast) * self.brightness * float(_GREY @ mean_rgb)
        return (coef @ _COLOUR_BASIS).reshape(3, 3), np.full(3, offset)


def uint8_planes(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W). PIL packs one band per call in C: cheaper than an interleaved-to-planar
    transpose in numpy or torch (which would otherwise fall to finish_batch on a CPU)."""
    w, h = img.size
    bands = [np.frombuffer(img.tobytes("raw", band), dtype=np.uint8) for band in "RGB"]
    return torch.from_numpy(np.stack(bands).reshape(3, h, w))


class Standardizer:
    """The per-image colour map as a (3, 6) float32 array [A | b | low | high]: standardised = clamp(A @ rgb + b,
    low, high) with rgb the raw 0..255 values. A and b fold the jitter map (on [0, 1]), /255 and (x - mean) / std;
    low/high are the jittered image's [0, 1] clamp in standardised units."""

    def __init__(self, stats: dict[str, list[float]]):
        mean, std = np.asarray(stats["mean"], dtype=np.float64), np.asarray(stats["std"], dtype=np.float64)
        self.degenerate = bool((std == 0).any())  # std 0 makes non-finite inputs; the engine names the step
        with np.errstate(divide="ignore", invalid="ignore"):
            self.scale, self.offset = 1.0 / std, -mean / std
            self.bounds = np.stack([-mean / std, (1.0 - mean) / std], axis=1)
        self.plain = self.map(np.eye(3), np.zeros(3))

    def map(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.empty((3, 6), np.float32)
        with np.errstate(invalid="ignore" if self.degenerate else "warn"):
            out[:, :3] = a * (self.scale / 255.0)[:, None]
            out[:, 3] = b * self.scale + self.offset
        out[:, 4:] = self.bounds
        return out


def finish_batch(batch: dict[str, Any], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """uint8 images + colour maps -> standardised `dtype` images on `device`: one batched matmul and a clamp.
    Run it where the batch lands (the GPU, in training) so loader workers only decode, flip and rotate; a batch that
    is already finished passes through unchanged."""
    out = dict(batch)
    for slot in ("x", "t"):
        maps = out.pop(f"{slot}_map", None)
        if maps is None:
            continue
        images = out[slot].to(device, non_blocking=True)
        n, c, h, w = images.shape
        maps = maps.to(device, torch.float32, non_blocking=True)
        y = torch.baddbmm(maps[:, :, 3:4], maps[:, :, :3], images.reshape(n, c, h * w).float())
        if y.device.type == "cpu":  # scalar-bound clamps are the fast CPU kernel
            bounds = maps[:, :, 4:].tolist()
            for i, j in np.ndindex(n, c):
                y[i, j].clamp_(*bounds[i][j])
        else:
            y = torch.clamp(y, maps[:, :, 4:5], maps[:, :, 5:6])
        out[slot] = y.view(n, c, h, w).to(dtype)
    return out


def mag_stats(manifest: dict[str, Any], mag: float) -> dict[str, list[float]]:
    name = mag_name(mag)
    try:
        stats = manifest["stats"][name]
        return {"mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]]}
    except (KeyError, TypeError):
        raise DataError(f"manifest.json: no stats for {name} (have {', '.join(manifest.get('stats', {})) or 'none'}): "
                        "they come from labeled train slides, and its train split has "
                        f"{sum(manifest.get('splits', {}).get('train', {}).get('class_histogram', {}).values())} "
                        "labeled samples") from None


# ---------------------------------------------------------------------------------------------- the stream


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
    def _ordered(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        """Global order strided across ranks: rank-local index k <-> global sample k*world + rank."""
        s = self.spec
        cycle = s.samples >= 0
        local = 0
        while True:
            emitted_this_pass = False
            for i, raw in enumerate(_raw_samples(s.urls)):
                if i % s.world != s.rank:
                    continue
                emitted_this_pass = True
                if s.samples >= 0 and local >= s.samples:
                    return
                raw["__pos__"] = local
                raw["__draw__"] = str(local * s.world + s.rank)  # the global index: world-size invariant
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
                yield from _raw_samples([s.urls[rng.randrange(len(s.urls))]])

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
        else:
            groups = _chunks(self._ordered(worker, workers), s.micro_batch, drop_last=s.samples >= 0)
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
            flat = sorted((x for g in window for x in g), key=lambda r: (math.prod(_sample_size(r, key)), r["__pos__"]))
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
        wanted = {"labeled": [low, "cls"], "unlabeled": [low], "paired": [high, low, "cls"]}[s.mode]
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
        out: dict[str, Any] = {"key": dec["__key__"], "y": dec.get("cls", -1)}
        for slot, name in names.items():
            standardizer = self._standardizer(name)
            out[f"{slot}_map"] = standardizer.plain if jitter is None else standardizer.map(*jitter)
            out[slot] = pixels[slot]
        return out


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
    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "y": torch.tensor([s["y"] for s in samples])}
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


def worker_error_line(message: str) -> str:
    """torch re-raises a loader worker's exception with the worker's traceback in its message; keep the one line
    the worker raised (the traceback's last line, without the exception's type)."""
    if "Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]+: ", "", last.strip())


class ShardLoader(torch.utils.data.DataLoader):
    """A DataLoader whose errors stay one line, whichever process (main or worker) raised them."""

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        batches = super().__iter__()
        try:
            yield from batches
        except HpcdistillError as err:
            raise type(err)(worker_error_line(str(err))) from None


def make_loader(spec: StreamSpec, num_workers: int = 0, pin_memory: bool = False) -> ShardLoader:
    """batch_size=None: the stream batches itself (per-worker split, bucketing); the loader only adds workers.
    pin_memory (for a GPU): page-locked batches, so finish_batch's non_blocking copies really overlap."""
    return ShardLoader(
        ShardStream(spec), batch_size=None, num_workers=num_workers, persistent_workers=False, pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
        worker_init_fn=leave_requeue_to_main_process if num_workers else None,
    )
