"""Data pipelines: pair alignment under augmentation, equal steps per rank, exact validation split, safe decoding."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from hpcdistill.config import AugmentConfig
from hpcdistill.data import (AugmentDraw, ShardStream, StreamSpec, finish_batch, make_loader, per_rank_samples,
                             read_manifest, resolve_sets)
from hpcdistill.errors import HpcdistillError

CLASSES = ["normal", "duodenitis", "celiac"]
STATS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def write_tiny_shards(out: Path, splits: dict[str, list[int]], *, low_size=(8, 8), vary=False, labeled=("train", "val"),
                      mags=(10.0, 2.5), seed=0, stats=None, marker=False, extra=None) -> Path:
    """Shards in the sharder's format (shards/README.md): {split}-NNNNNN.tar holding 10x.png + low-mag png(s) + cls + json, and a
    manifest. The 10x image is the low-mag image upsampled by nearest neighbour, so the pair is exactly aligned.
    `splits` maps split -> samples per shard. `marker` puts one white low-mag pixel at a random place.
    Hand-made only for what the sharder cannot give on purpose: exactly aligned pairs (it resamples with Lanczos),
    chosen shard sizes, pickles and missing members, zero std stats. Real shards: conftest's `tiny_dataset`."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = {"tool": "hpcdistill", "version": "test", "params": {}, "mags": list(mags), "image_format": "png",
                "classes": CLASSES, "splits": {}, "stats": {f"{m:g}x": dict(stats or STATS) for m in mags}, "sizes": {},
                "slides": {}}
    for split, counts in splits.items():
        names, n = [], 0
        for s, count in enumerate(counts):
            name = f"{split}-{s:06d}.tar"
            names.append(name)
            with wds.TarWriter(str(out / name)) as sink:
                for i in range(count):
                    w, h = low_size
                    if vary:
                        w, h = w + int(rng.integers(0, 3)) * 2, h + int(rng.integers(0, 3)) * 2
                    label = int(rng.integers(len(CLASSES)))
                    low = (rng.random((h, w, 3)) * 120 + 40 + 40 * label).astype(np.uint8)
                    if marker:
                        low[rng.integers(h), rng.integers(w)] = 255
                    sample = {"__key__": f"{split}_s{s}_t{i:03d}_w000", "json": None}
                    sizes = {}
                    for m in mags:
                        f = int(round(m / min(mags)))
                        img = low.repeat(f, 0).repeat(f, 1)
                        sizes[f"{m:g}x"] = [img.shape[1], img.shape[0]]
                        buf = io.BytesIO()
                        Image.fromarray(img).save(buf, format="PNG")
                        sample[f"{m:g}x.png"] = buf.getvalue()
                    if split in labeled:
                        sample["cls"] = str(label).encode()
                    sample["json"] = json.dumps({"slide": f"{split}{s}", "patient": "p", "tissue": i, "window": 0,
                                                 "box_l0": [0, 0, 1, 1], "base_mag": 40.0, "mpp": 0.25, "sizes": sizes,
                                                 "label": CLASSES[label] if split in labeled else None,
                                                 "split": split}).encode()
                    sample.update(extra or {})
                    sink.write(sample)
                    n += 1
        manifest["splits"][split] = {"samples": n, "tissues": n, "slides": len(counts), "patients": 1, "shards": names,
                                     "class_histogram": {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def spec(shards: Path, split: str, **kw) -> StreamSpec:
    manifest = read_manifest(shards)
    base = dict(urls=resolve_sets(shards, manifest, [split]).urls, mode="paired", mag=2.5, teacher_mag=10.0,
                stats={"10x": STATS, "2.5x": STATS}, micro_batch=1, samples=-1, sampler="ordered")
    base.update(kw)
    return StreamSpec(**base)


def keys(stream) -> list[list[str]]:
    return [b["key"] for b in stream]


def test_pair_stays_aligned_under_augmentation(tmp_path):
    shards = write_tiny_shards(tmp_path, {"train": [40]}, low_size=(6, 10), marker=True)
    aug = AugmentConfig(flips=True, rot90=True, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)
    batches = list(ShardStream(spec(shards, "train", augment=aug, seed=3)))
    plain = list(ShardStream(spec(shards, "train")))
    rotated = 0
    for b, p in zip(batches, plain):
        x, t = b["x"][0] * 0.25 + 0.5, b["t"][0] * 0.25 + 0.5
        assert t.shape[1:] == (x.shape[1] * 4, x.shape[2] * 4)  # rotations keep non-square pairs consistent
        rotated += x.shape[1:] != p["x"].shape[2:]
        # same geometry and the same colour jitter: the 10x image, box-averaged to 2.5x, IS the 2.5x image
        torch.testing.assert_close(F.avg_pool2d(t[None], 4)[0], x, atol=2e-4, rtol=0)
        # the marker pixel moved to the same place in both
        pos = np.unravel_index(int(x.sum(0).argmax()), x.shape[1:])
        pos_t = np.unravel_index(int(t.sum(0).argmax()), t.shape[1:])
        assert (pos_t[0] // 4, pos_t[1] // 4) == pos
    assert 5 < rotated < 35  # odd rotations happened, and not always
    changed = sum(not torch.equal(b["x"], p["x"]) for b, p in zip(batches, plain))
    assert changed >= 35  # colour jitter applied


def test_real_shard_pairs_stay_aligned_under_augmentation(tiny_dataset):
    shards, manifest = tiny_dataset["shards"], tiny_dataset["manifest"]
    stats = {name: manifest["stats"][name] for name in ("10x", "2.5x")}
    aug = AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)
    stream = ShardStream(StreamSpec(urls=resolve_sets(shards, manifest, ["train"]).urls, mode="paired", mag=2.5,
                                    teacher_mag=10.0, stats=stats, micro_batch=1, samples=-1, augment=aug, seed=5))

    def unstandardize(x, s):
        return x * torch.tensor(s["std"]).view(3, 1, 1) + torch.tensor(s["mean"]).view(3, 1, 1)

    aligned, flipped = [], []
    for b in stream:
        x, t = unstandardize(b["x"][0], stats["2.5x"]), unstandardize(b["t"][0], stats["10x"])
        h, w = x.shape[1:]
        assert abs(t.shape[1] - 4 * h) <= 4 and abs(t.shape[2] - 4 * w) <= 4  # rotated together
        aligned.append(float((F.adaptive_avg_pool2d(t, (h, w)) - x).abs().mean()))
        flipped.append(float((F.adaptive_avg_pool2d(t.flip(-1), (h, w)) - x).abs().mean()))
    assert len(aligned) == manifest["splits"]["train"]["samples"]
    # Lanczos at sharding time vs box-averaging here leaves a small residue; a geometry or colour mismatch does not
    assert max(aligned) < 0.06 and sum(aligned) < 0.5 * sum(flipped)


def test_deferred_colour_finished_later_equals_the_finished_stream(tmp_path):
    shards = write_tiny_shards(tmp_path, {"train": [6]}, vary=True)
    kw = dict(samples=6, micro_batch=2, bucketed=True, augment=AugmentConfig(hue=0.2), seed=4)
    finished = list(ShardStream(spec(shards, "train", **kw)))
    deferred = list(ShardStream(spec(shards, "train", defer_colour=True, **kw)))
    assert deferred[0]["x"].dtype == torch.uint8 and deferred[0]["x_map"].shape == (2, 3, 6)
    for f, d in zip(finished, deferred):
        later = finish_batch(d, "cpu", torch.float32)
        assert set(later) == set(f) == {"key", "y", "x", "t"}
        assert torch.equal(later["x"], f["x"]) and torch.equal(later["t"], f["t"])
    again = finish_batch(finished[0])
    assert all(again[k] is v for k, v in finished[0].items())  # finished batches pass through


def test_folded_colour_map_matches_the_stepwise_definition():
    rng = np.random.default_rng(0)
    x = rng.random((3, 200))
    grey = np.array([0.299, 0.587, 0.114])
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    for draw in (AugmentDraw(False, False, 0, 1.2, 0.8, 1.3, 0.07), AugmentDraw(False, False, 0, 0.8, 1.2, 0.7, -0.4)):
        y = x * draw.brightness
        y = (y - (grey @ y).mean()) * draw.contrast + (grey @ y).mean()
        y = (y - grey @ y) * draw.saturation + grey @ y
        c, s = np.cos(2 * np.pi * draw.hue), np.sin(2 * np.pi * draw.hue)
        y = np.linalg.solve(to_yiq, np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ to_yiq @ y)
        a, b = draw.colour(x.mean(1))
        np.testing.assert_allclose(a @ x + b[:, None], y, atol=1e-12)


def test_geometry_is_flip_then_rot90_on_every_draw():
    img = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    for hflip in (False, True):
        for vflip in (False, True):
            for k in range(4):
                draw = AugmentDraw(hflip, vflip, k, 1.0, 1.0, 1.0, 0.0)
                want = np.asarray(img)[:: -1 if vflip else 1, :: -1 if hflip else 1]
                assert np.array_equal(np.asarray(draw.geometry(img)), np.rot90(want, k))


def test_equal_steps_per_rank_with_unequal_shards(tmp_path):
    shards = write_tiny_shards(tmp_path, {"train": [7, 2, 1]})  # 10 samples, very uneven shards
    per_rank = per_rank_samples(10, 3, unit=2)  # ceil(10/3)=4 -> 2 steps of 2 per rank
    assert per_rank == 4
    for sampler in ("resampled", "ordered"):
        counts = [len(keys(ShardStream(spec(shards, "train", micro_batch=2, samples=per_rank, rank=r, world=3,
                                            sampler=sampler, shuffle_buffer=4)))) for r in range(3)]
        assert counts == [2, 2, 2], sampler


def test_ordered_stream_is_world_size_invariant_and_val_is_exact(tmp_path):
    shards = write_tiny_shards(tmp_path, {"train": [5, 4], "val": [4, 1, 2]})
    one = sum(keys(ShardStream(spec(shards, "train", samples=8))), [])
    two = [sum(keys(ShardStream(spec(shards, "train", samples=4, rank=r, world=2))), []) for r in range(2)]
    assert one == [k for pair in zip(*two) for k in pair]  # global sample i -> rank i % world
    # validation: every sample exactly once across ranks, no duplication, no cycling
    val = [sum(keys(ShardStream(spec(shards, "val", rank=r, world=3))), []) for r in range(3)]
    flat = sum(val, [])
    assert len(flat) == len(set(flat)) == 7


def test_workers_and_resume_skip_reproduce_the_sequence(tmp_path):
    shards = write_tiny_shards(tmp_path, {"train": [6, 5]})
    aug = AugmentConfig()
    for sampler in ("ordered", "resampled"):
        kw = dict(samples=8, sampler=sampler, augment=aug, shuffle_buffer=3, seed=1, epoch=2)
        ref = list(make_loader(spec(shards, "train", **kw), num_workers=0))
        two = list(make_loader(spec(shards, "train", **kw), num_workers=2))
        if sampler == "ordered":  # resampled draws per worker: a different, equally valid, stream
            assert [b["key"] for b in two] == [b["key"] for b in ref]
        assert len(two) == len(ref) == 8
        tail = list(make_loader(spec(shards, "train", start_batch=5, **kw), num_workers=0))
        assert [b["key"] for b in tail] == [b["key"] for b in ref[5:]]
        for a, b in zip(tail, ref[5:]):
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["t"], b["t"])  # same augmentation draws


def ignored_signals(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)


def test_loader_workers_leave_the_requeue_signal_to_the_main_process(tmp_path):
    # SLURM signals every process of a job step; a forked worker would otherwise run the trainer's requeue handler.
    shards = write_tiny_shards(tmp_path, {"train": [6]})
    usr2 = 1 << (signal.SIGUSR2 - 1)
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    before = set(children.read_text().split())
    assert not ignored_signals(os.getpid()) & usr2  # the main process keeps its handler
    batches = iter(make_loader(spec(shards, "train", samples=6), num_workers=1))
    next(batches)
    workers = set(children.read_text().split()) - before
    assert len(workers) == 1 and all(ignored_signals(int(p)) & usr2 for p in workers)
    assert len(list(batches)) == 5


def test_bucketed_batches_crop_pairs_consistently(tmp_path):
    shards = write_tiny_shards(tmp_path, {"train": [12]}, vary=True)
    for b in ShardStream(spec(shards, "train", micro_batch=3, samples=12, bucketed=True, bucket_window=4)):
        assert b["x"].shape[0] == 3
        assert b["t"].shape[2:] == (b["x"].shape[2] * 4, b["x"].shape[3] * 4)
        torch.testing.assert_close(F.avg_pool2d(b["t"], 4), b["x"], atol=2e-4, rtol=0)
    with pytest.raises(HpcdistillError, match="different image sizes"):
        list(ShardStream(spec(shards, "train", micro_batch=3, samples=12)))


def test_pickles_in_shards_are_never_decoded(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    blob = pickle.dumps(Evil())
    shards = write_tiny_shards(tmp_path / "s", {"train": [3]}, extra={"pyd": blob, "pth": blob, "pickle": blob})
    batches = list(ShardStream(spec(shards, "train", mode="labeled")))
    assert len(batches) == 3 and not marker.exists()
    assert set(batches[0]) == {"key", "y", "x"}


def test_missing_pieces_are_named(tmp_path):
    shards = write_tiny_shards(tmp_path, {"aux": [2]}, labeled=())
    with pytest.raises(HpcdistillError, match=r"aux_s0_t000_w000 has no cls label"):
        list(ShardStream(spec(shards, "aux", mode="labeled")))
    with pytest.raises(HpcdistillError, match=r"has no 5x image"):
        list(ShardStream(spec(shards, "aux", mode="unlabeled", mag=5.0)))
    with pytest.raises(HpcdistillError, match=r"nope-000000.tar: shard not found"):
        resolve_sets(shards, read_manifest(shards), ["nope-{000000..000001}.tar"])
    with pytest.raises(HpcdistillError, match="manifest not found"):
        read_manifest(tmp_path / "empty")
    # unlabeled paired samples carry y = -1
    assert [int(b["y"][0]) for b in ShardStream(spec(shards, "aux"))] == [-1, -1]
    # a brace pattern counts its samples from the tar headers
    assert resolve_sets(shards, read_manifest(shards), ["aux-{000000..000000}.tar"]).samples == 2
