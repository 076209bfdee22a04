"""Data pipelines: pair alignment under augmentation, equal steps per rank, exact validation split, safe decoding.

Real shards (conftest's `tiny_dataset` and `small_dataset`, cut by the sharder from synthetic slides) wherever the
test needs no special samples. Hand-made shards only where it does (exactly aligned pairs: the sharder resamples
with Lanczos; pickled payloads), and those are written by the sharder's own pieces: its tar member layout
(shard_writer.append_sample), its per-slide records (shard_cut.SlideResult) and its manifest builder.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcdistill.common.config import AugmentConfig
from hpcdistill.common.errors import HpcdistillError
from hpcdistill.common.files import atomic_write_bytes
from hpcdistill.common.mags import mag_name
from hpcdistill.data.augment import AugmentDraw, apply_moves
from hpcdistill.data.device_batch import finish_batch, require_device_decode
from hpcdistill.data.streams import ShardStream, StreamSpec, make_loader, per_rank_samples
from hpcdistill.shards.cut import Sample, SlideResult, _add_pixel_sums
from hpcdistill.shards.manifest import MANIFEST, build_manifest, read_manifest
from hpcdistill.shards.plan import ShardParams, SlideJob, params_fingerprint
from hpcdistill.shards.reader import count_samples, decode_sample, raw_samples, resolve_sets, tar_members
from hpcdistill.shards.sample_format import image_member, label_members, sample_key, sample_meta
from hpcdistill.shards.writer import append_sample

CLASSES = ["celiac", "duodenitis", "normal"]
STATS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


# ---------------------------------------------------------------------------------------------- hand-made shards


def aligned_samples(
    n: int, rng: np.random.Generator, label: int | None, *, low_size=(8, 8), vary=False, marker=False, mags=(10.0, 2.5)
) -> list[dict]:
    """One slide's samples (class id `label`, None = unlabeled) whose higher-mag images are the lowest-mag image
    upsampled by nearest neighbour: exactly aligned pairs. `marker` puts one white low-mag pixel at a random place;
    `vary` draws sizes (w, h) + {0, 2, 4}."""
    out = []
    for _ in range(n):
        w, h = low_size
        if vary:
            w, h = w + int(rng.integers(0, 3)) * 2, h + int(rng.integers(0, 3)) * 2
        low = (rng.random((h, w, 3)) * 120 + 40 + 40 * (label or 0)).astype(np.uint8)
        if marker:
            low[rng.integers(h), rng.integers(w)] = 255
        images = {}
        for m in mags:
            f = int(round(m / min(mags)))
            images[m] = low.repeat(f, 0).repeat(f, 1)
        out.append({"images": images, "label": label, "extra": {}})
    return out


def write_handmade_shards(out: Path, shards: dict[str, list[list[dict]]], mags=(10.0, 2.5)) -> Path:
    """`shards`: split -> its shards, each a list of samples {"images": {mag: HxWx3 uint8}, "label": class id or None,
    "extra": {ext: bytes}}; one slide per shard, one tissue per sample. Samples are encoded by the sharder's own
    `shards.sample_format` (PNG payloads); the manifest is the sharder's, built from per-slide records."""
    out.mkdir(parents=True, exist_ok=True)
    params = ShardParams(mags=mags, image_format="png")
    jobs: list[SlideJob] = []
    records: dict[str, dict] = {}
    written: dict[str, dict] = {}
    for split, shard_list in shards.items():
        for index, samples in enumerate(shard_list):
            slide, name = f"{split}{index}", f"{split}-{index:06d}.tar"
            (class_id,) = {s["label"] for s in samples}  # one label per slide, as in a labels CSV
            label = CLASSES[class_id] if class_id is not None else None
            job = SlideJob(f"/slides/{slide}.svs", slide, f"patient-{slide}", label, class_id, split)
            result = SlideResult(slide, "ok", None, split, 40.0, "test", tissues=len(samples))
            with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as archive:
                for tissue, s in enumerate(samples):
                    key = sample_key(slide, tissue, 0)
                    payloads, sizes = [], {}
                    for mag in params.mags:
                        pixels = s["images"][mag]
                        sizes[mag_name(mag)] = [pixels.shape[1], pixels.shape[0]]
                        if split == "train" and s["label"] is not None:  # the sharder's stats: labeled train only
                            _add_pixel_sums(result.pixel_sums.setdefault(mag_name(mag), [0.0] * 7), pixels)
                        payloads.append(image_member(mag, pixels, "png", params.jpeg_quality))
                    meta = sample_meta(
                        slide=slide,
                        patient=job.patient,
                        tissue=tissue,
                        window=0,
                        box_l0=[0, 0, 1, 1],
                        base_mag=40.0,
                        mpp=0.25,
                        sizes=sizes,
                        split=split,
                        label=CLASSES[s["label"]] if s["label"] is not None else None,
                    )
                    payloads += label_members(s["label"], meta)
                    payloads += list(s["extra"].items())
                    append_sample(archive, key, payloads)
                    result.samples.append(Sample(key, [], sizes, tissue))
            jobs.append(job)
            records[slide] = result.record(job)
            written[name] = {
                "split": split,
                "bytes": (out / name).stat().st_size,
                "keys": [x.key for x in result.samples],
            }
    jobs.sort(key=lambda j: j.slide)
    fingerprint = params_fingerprint(params, [Path(j.path) for j in jobs], None)
    manifest = build_manifest(params, fingerprint, CLASSES, jobs, records, written)
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return out


def handmade(out: Path, splits: dict[str, list[int]], seed: int = 0, **kw) -> Path:
    """Shards of aligned samples: split -> samples per shard (one slide per shard, its class drawn at random)."""
    rng = np.random.default_rng(seed)
    return write_handmade_shards(
        out,
        {
            split: [aligned_samples(n, rng, int(rng.integers(len(CLASSES))), **kw) for n in counts]
            for split, counts in splits.items()
        },
    )


# ---------------------------------------------------------------------------------------------- helpers


def spec(shards: Path, split: str, **kw) -> StreamSpec:
    """An ordered, unaugmented paired 2.5x/10x stream over a split, standardised with the manifest's stats."""
    manifest = read_manifest(shards)
    base = dict(
        urls=resolve_sets(shards, manifest, [split]).urls,
        mode="paired",
        mag=2.5,
        teacher_mag=10.0,
        stats=manifest["stats"],
        micro_batch=1,
        samples=-1,
        sampler="ordered",
    )
    base.update(kw)
    return StreamSpec(**base)


def keys(stream) -> list[list[str]]:
    return [b["key"] for b in stream]


def split_keys(shards: Path, split: str) -> list[str]:
    """The split's sample keys in shard order, read straight from the tars."""
    urls = resolve_sets(shards, read_manifest(shards), [split]).urls
    return [raw["__key__"] for raw in raw_samples(urls)]


def shard_counts(shards: Path, split: str) -> list[int]:
    return [count_samples(url) for url in resolve_sets(shards, read_manifest(shards), [split]).urls]


# ---------------------------------------------------------------------------------------------- the hand-made shards


def test_handmade_shards_are_laid_out_like_the_sharders(small_dataset, tmp_path):
    """The hand-made shards below must not drift from the real format: same manifest fields, member names and
    sample metadata as the sharder's own output, and counts that agree with the tars."""
    mine = handmade(tmp_path, {"train": [3, 2], "val": [2]})
    real_manifest, manifest = small_dataset["manifest"], read_manifest(mine)
    assert set(manifest) == set(real_manifest)
    assert set(manifest["splits"]["train"]) == set(real_manifest["splits"]["train"])
    assert set(manifest["slides"]["train0"]) == set(next(iter(real_manifest["slides"].values())))
    for split, counts in (("train", [3, 2]), ("val", [2])):
        entry = manifest["splits"][split]
        assert shard_counts(mine, split) == counts and entry["samples"] == sum(counts)
        assert sum(entry["class_histogram"].values()) == sum(counts)  # labeled samples are counted by class
    assert set(manifest["stats"]) == {"10x", "2.5x"}  # colour statistics from the labeled train slides

    def layout(shards: Path) -> tuple[set, set]:
        raw = next(raw_samples(resolve_sets(shards, read_manifest(shards), ["train"]).urls))
        members = {k.replace(".png", ".img").replace(".jpg", ".img") for k in raw if not k.startswith("__")}
        return members, set(json.loads(raw["json"]))

    real_members, real_meta = layout(small_dataset["shards"])
    members, meta = layout(mine)
    assert meta == real_meta and members == real_members - {"5x.img"}  # the hand-made ones hold 10x and 2.5x only


# ---------------------------------------------------------------------------------------------- augmentation


def test_pair_stays_aligned_under_augmentation(tmp_path):
    shards = handmade(tmp_path, {"train": [40]}, low_size=(6, 10), marker=True)
    aug = AugmentConfig(flips=True, rot90=True, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)
    stats = {"10x": STATS, "2.5x": STATS}
    batches = list(ShardStream(spec(shards, "train", augment=aug, seed=3, stats=stats)))
    plain = list(ShardStream(spec(shards, "train", stats=stats)))
    assert len(batches) == len(plain) == 40
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
    stream = ShardStream(
        StreamSpec(
            urls=resolve_sets(shards, manifest, ["train"]).urls,
            mode="paired",
            mag=2.5,
            teacher_mag=10.0,
            stats=stats,
            micro_batch=1,
            samples=-1,
            augment=aug,
            seed=5,
        )
    )

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


def test_finished_on_the_device_later_equals_the_finished_stream(small_dataset):
    shards = small_dataset["shards"]
    kw = dict(samples=6, micro_batch=2, bucketed=True, augment=AugmentConfig(hue=0.2), seed=4)
    finished = list(ShardStream(spec(shards, "train", **kw)))
    loose = list(ShardStream(spec(shards, "train", finish_on_device=True, **kw)))
    assert len(finished) == len(loose) == 3
    assert [img.dtype for img in loose[0]["x"]] == [torch.uint8] * 2 and loose[0]["x_map"].shape == (2, 3, 6)
    assert loose[0]["x"][0].shape[-1] == 3  # decoded (H, W, 3): the loader's only per-pixel work is the decode
    for f, d in zip(finished, loose):
        later = finish_batch(d, "cpu", torch.float32)
        assert set(later) == set(f) == {"key", "slide", "y", "x", "t"}
        assert later["key"] == f["key"] and later["slide"] == f["slide"]
        assert torch.equal(later["x"], f["x"]) and torch.equal(later["t"], f["t"])
    again = finish_batch(finished[0])
    assert all(again[k] is v for k, v in finished[0].items())  # finished batches pass through


@pytest.mark.parametrize("bucketed", [False, True])
def test_decode_on_device_reads_the_bytes_and_finishes_to_identical_tensors(small_dataset, bucketed):
    """streams.decode: gpu on a CPU rehearsal: the loader ships each JPEG's bytes unchanged, and finishing decodes them
    (PIL off a GPU, nvJPEG on one) into exactly the default path's tensors: augmentation, crops and pivot included."""
    shards = small_dataset["shards"]
    kw = dict(
        samples=8,
        micro_batch=2 if bucketed else 1,
        bucketed=bucketed,
        seed=7,
        finish_on_device=True,
        augment=AugmentConfig(brightness=0.3, contrast=0.4, saturation=0.3, hue=0.1),
    )
    default = list(ShardStream(spec(shards, "train", **kw)))
    encoded = list(ShardStream(spec(shards, "train", decode_on_device=True, **kw)))
    jpeg = {raw["__key__"]: raw["10x.jpg"] for raw in raw_samples(spec(shards, "train").urls)}
    assert len(default) == len(encoded) == 8 // kw["micro_batch"]
    for d, e in zip(default, encoded):
        assert e["encoded"] and all(blob.dim() == 1 for blob in e["t"])
        assert [bytes(blob.numpy()) for blob in e["t"]] == [jpeg[k] for k in e["key"]]  # identical bytes in
        a, b = finish_batch(d), finish_batch(e)
        assert a["key"] == b["key"] and torch.equal(a["x"], b["x"]) and torch.equal(a["t"], b["t"])  # identical out
    moved = sum(bool(b["moves"].any()) for b in encoded)
    assert moved >= len(encoded) // 2  # flips and rotations were drawn, so the comparison covers them


def test_decode_on_device_refuses_a_cut_jpeg_in_the_loader(small_dataset):
    raw = next(raw_samples(spec(small_dataset["shards"], "train").urls))
    raw["10x.jpg"] = raw["10x.jpg"][: len(raw["10x.jpg"]) // 2]
    with pytest.raises(HpcdistillError, match=r"train-000000\.tar: sample \S+: its 10x: not a complete JPEG"):
        decode_sample(raw, ["10x"], encoded=True)
    with pytest.raises(HpcdistillError, match="its 10x cannot be decoded"):  # the loader's own decode refuses it too
        decode_sample(raw, ["10x"])


def test_decode_gpu_is_refused_on_a_cpu_run():
    with pytest.raises(
        HpcdistillError,
        match=r"^data\.decode: gpu decodes JPEGs with nvJPEG on the training GPU, "
        r"but this run trains on cpu; set data\.decode=cpu$",
    ):
        require_device_decode(torch.device("cpu"))


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


def test_moves_are_flip_then_rot90_on_every_draw():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # (H, W, C)
    chw = torch.from_numpy(img).permute(2, 0, 1)
    for hflip in (False, True):
        for vflip in (False, True):
            for k in range(4):
                draw = AugmentDraw(hflip, vflip, k, 1.0, 1.0, 1.0, 0.0)
                want = np.rot90(img[:: -1 if vflip else 1, :: -1 if hflip else 1], k)
                assert np.array_equal(apply_moves(chw, *draw.moves).permute(1, 2, 0).numpy(), want)


# ---------------------------------------------------------------------------------------------- order and ranks


def test_equal_steps_per_rank_with_unequal_shards(small_dataset):
    shards = small_dataset["shards"]
    total = small_dataset["manifest"]["splits"]["train"]["samples"]
    counts = shard_counts(shards, "train")
    assert sum(counts) == total and len(set(counts)) > 1  # the sharder's cap leaves a shorter last shard
    for world in (3, 4):
        per_rank = per_rank_samples(total, world, unit=2)
        for sampler in ("resampled", "ordered"):
            steps = [
                len(
                    keys(
                        ShardStream(
                            spec(
                                shards,
                                "train",
                                micro_batch=2,
                                samples=per_rank,
                                rank=r,
                                world=world,
                                sampler=sampler,
                                shuffle_buffer=4,
                                bucketed=True,
                            )
                        )
                    )
                )
                for r in range(world)
            ]  # bucketed: real tissues differ in size
            assert steps == [per_rank // 2] * world, (world, sampler)


def test_per_rank_samples_rounds_to_whole_steps():
    assert per_rank_samples(10, 3, unit=2) == 4  # ceil(10/3) = 4
    assert per_rank_samples(11, 2, unit=4) == 4  # ceil(11/2) = 6 -> 4 (whole steps of 4)
    assert per_rank_samples(3, 8, unit=4) == 4  # at least one step, however few samples
    assert per_rank_samples(64, 1, unit=16) == 64


def test_ordered_stream_is_world_size_invariant_and_val_is_exact(small_dataset):
    shards = small_dataset["shards"]
    one = sum(keys(ShardStream(spec(shards, "train", samples=8))), [])
    two = [sum(keys(ShardStream(spec(shards, "train", samples=4, rank=r, world=2))), []) for r in range(2)]
    assert one == [k for pair in zip(*two) for k in pair]  # global sample i -> rank i % world
    assert one == split_keys(shards, "train")[:8]  # the global order is the shards' order
    # validation: every sample exactly once across ranks, no duplication, no cycling, over uneven shards
    val_keys = split_keys(shards, "val")
    assert len(shard_counts(shards, "val")) > 1
    assert len(val_keys) == small_dataset["manifest"]["splits"]["val"]["samples"]
    for world in (2, len(shard_counts(shards, "val")) + 1):  # by shard, and (more ranks than shards) by sample
        val = [sum(keys(ShardStream(spec(shards, "val", rank=r, world=world))), []) for r in range(world)]
        flat = sum(val, [])
        assert sorted(flat) == sorted(val_keys) and len(flat) == len(set(flat)), world


def test_single_pass_reads_each_shard_once(small_dataset, monkeypatch):
    """Validation and evaluation: each (rank, worker) reads only its own shards where there are enough of them."""
    from hpcdistill.data import streams

    shards = small_dataset["shards"]
    urls = resolve_sets(shards, small_dataset["manifest"], ["val"]).urls
    assert len(urls) >= 2
    opened: list[str] = []
    real = streams.raw_samples
    monkeypatch.setattr(streams, "raw_samples", lambda us: (opened.extend(us), real(us))[1])
    stream = ShardStream(spec(shards, "val"))
    seen = [raw["__key__"] for w in range(2) for _, group in stream._raw_batches(w, 2) for raw in group]
    assert sorted(opened) == sorted(urls)  # every shard opened once over both workers, not once per worker
    assert sorted(seen) == sorted(split_keys(shards, "val")) and len(seen) == len(set(seen))
    assert streams.single_pass_share(urls[:2], 0, 1, 1, 3) == (urls[:2], 1, 0, False)  # 3 workers, 2 shards: stride
    assert streams.single_pass_share(urls[:2], 1, 2, 0, 2) == ([urls[1]], 1, 0, False)  # its 1 shard, 2 workers
    assert streams.single_pass_share(urls[:2], 1, 2, 0, 1) == ([urls[1]], 1, 0, True)
    assert streams.single_pass_share(urls[:1], 1, 2, 0, 1) == (urls[:1], 2, 1, False)  # 2 ranks, 1 shard: by sample


def test_batches_carry_each_samples_slide(small_dataset):
    shards, manifest = small_dataset["shards"], small_dataset["manifest"]
    urls = resolve_sets(shards, manifest, ["test"]).urls
    slide_of = {raw["__key__"]: decode_sample(raw, ["json"])["json"]["slide"] for raw in raw_samples(urls)}
    # bucketing regroups samples by size: each slide must travel with its own sample
    batches = list(ShardStream(spec(shards, "test", mode="labeled", micro_batch=2, samples=-1, bucketed=True)))
    assert max(len(b["slide"]) for b in batches) == 2
    seen = {k: s for b in batches for k, s in zip(b["key"], b["slide"])}
    assert seen == slide_of
    test_slides = {name for name, s in manifest["slides"].items() if s["split"] == "test" and s["status"] == "ok"}
    assert set(seen.values()) == test_slides and len(test_slides) == manifest["splits"]["test"]["slides"] > 1


def test_workers_and_resume_skip_reproduce_the_sequence(small_dataset):
    shards = small_dataset["shards"]
    aug = AugmentConfig()
    for sampler in ("ordered", "resampled"):
        kw = dict(samples=8, sampler=sampler, augment=aug, shuffle_buffer=3, seed=1, epoch=2)
        ref = list(make_loader(spec(shards, "train", **kw), num_workers=0))
        two = list(make_loader(spec(shards, "train", **kw), num_workers=2))
        if sampler == "ordered":  # resampled draws per worker: a different, equally valid, stream
            assert [b["key"] for b in two] == [b["key"] for b in ref]
            for a, b in zip(two, ref):
                assert torch.equal(a["x"], b["x"]) and torch.equal(a["t"], b["t"])
        assert len(two) == len(ref) == 8
        tail = list(make_loader(spec(shards, "train", start_batch=5, **kw), num_workers=0))
        assert [b["key"] for b in tail] == [b["key"] for b in ref[5:]]
        for a, b in zip(tail, ref[5:]):
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["t"], b["t"])  # same augmentation draws
        other_epoch = list(make_loader(spec(shards, "train", **{**kw, "epoch": 3}), num_workers=0))
        assert any(not torch.equal(a["x"], b["x"]) for a, b in zip(other_epoch, ref))  # draws depend on the epoch


def ignored_signals(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)


def test_loader_workers_leave_the_requeue_signal_to_the_main_process(small_dataset):
    # SLURM signals every process of a job step; a forked worker would otherwise run the trainer's requeue handler.
    shards = small_dataset["shards"]
    usr2 = 1 << (signal.SIGUSR2 - 1)
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    before = set(children.read_text().split())
    assert not ignored_signals(os.getpid()) & usr2  # the main process keeps its handler
    batches = iter(make_loader(spec(shards, "train", samples=6), num_workers=1))
    next(batches)
    workers = set(children.read_text().split()) - before
    assert len(workers) == 1 and all(ignored_signals(int(p)) & usr2 for p in workers)
    assert len(list(batches)) == 5


# ---------------------------------------------------------------------------------------------- batching and decoding


def test_bucketed_batches_crop_pairs_consistently(tmp_path):
    shards = handmade(tmp_path, {"train": [12]}, vary=True)
    stats = {"10x": STATS, "2.5x": STATS}
    batches = list(
        ShardStream(spec(shards, "train", micro_batch=3, samples=12, bucketed=True, bucket_window=4, stats=stats))
    )
    assert len(batches) == 4
    assert sorted(k for b in batches for k in b["key"]) == sorted(split_keys(shards, "train"))
    cropped = 0
    for b in batches:
        assert b["x"].shape[0] == 3
        assert b["t"].shape[2:] == (b["x"].shape[2] * 4, b["x"].shape[3] * 4)
        torch.testing.assert_close(F.avg_pool2d(b["t"], 4), b["x"], atol=2e-4, rtol=0)
        cropped += b["x"].shape[2:] != (8, 8)
    assert cropped  # sorted by size: larger tissues are batched together instead of all cropped to the smallest
    with pytest.raises(HpcdistillError, match="different image sizes"):
        list(ShardStream(spec(shards, "train", micro_batch=3, samples=12, stats=stats)))


def test_pickles_in_shards_are_never_decoded(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    blob = pickle.dumps(Evil())
    samples = aligned_samples(3, np.random.default_rng(0), 1)
    for s in samples:
        s["extra"] = {"pyd": blob, "pth": blob, "pickle": blob}
    shards = write_handmade_shards(tmp_path / "s", {"train": [samples]})
    raw = next(raw_samples(resolve_sets(shards, read_manifest(shards), ["train"]).urls))
    assert raw["pyd"] == raw["pth"] == raw["pickle"] == blob  # the payloads really are in the shard
    batches = list(ShardStream(spec(shards, "train", mode="labeled")))
    assert len(batches) == 3 and not marker.exists()
    assert set(batches[0]) == {"key", "slide", "y", "x"}


def test_missing_pieces_are_named(small_dataset, tmp_path):
    shards, manifest = small_dataset["shards"], small_dataset["manifest"]
    aux = manifest["splits"]["aux1"]
    with pytest.raises(HpcdistillError, match=r"aux1-000000\.tar: sample \S+_t\d{3}_w\d{3} has no cls label"):
        list(ShardStream(spec(shards, "aux1", mode="labeled")))
    with pytest.raises(HpcdistillError, match=r"has no 1\.25x image \(has 10x\.jpg, 2\.5x\.jpg, 5x\.jpg, json\)"):
        list(ShardStream(spec(shards, "aux1", mode="unlabeled", mag=1.25)))
    with pytest.raises(HpcdistillError, match=r"nope-000000\.tar: shard not found"):
        resolve_sets(shards, manifest, ["nope-{000000..000001}.tar"])
    with pytest.raises(HpcdistillError, match="manifest not found"):
        read_manifest(tmp_path / "empty")
    # unlabeled paired samples carry y = -1
    assert [int(b["y"][0]) for b in ShardStream(spec(shards, "aux1"))] == [-1] * aux["samples"]
    # a brace pattern counts its samples from the tar headers, as the manifest counted them
    assert resolve_sets(shards, manifest, ["aux1-{000000..000000}.tar"]).samples == aux["samples"]
    train = manifest["splits"]["train"]
    pattern = f"train-{{000000..{len(train['shards']) - 1:06d}}}.tar"
    assert resolve_sets(shards, manifest, [pattern]).samples == train["samples"]


# ------------------------------------------------------------------------------------------------- reading the tars


def webdataset_members(path: Path) -> list[tuple]:
    from webdataset.tariterators import tar_file_expander, url_opener

    return [(m["fname"], m["data"], m["__url__"]) for m in tar_file_expander(url_opener([{"url": str(path)}])) if m]


def test_tar_members_read_the_sharders_tars_as_webdataset_does(small_dataset):
    for url in resolve_sets(small_dataset["shards"], small_dataset["manifest"], ["train", "val"]).urls:
        ours = [(m["fname"], m["data"], m["__url__"]) for m in tar_members(url)]
        assert ours and ours == webdataset_members(Path(url))


def test_tar_members_hand_other_tar_layouts_to_tarfile(small_dataset, tmp_path):
    """pax and GNU tars (long names from the 5th member on, a folder first) and a gzipped tar: the same members as
    webdataset reads."""
    url = resolve_sets(small_dataset["shards"], small_dataset["manifest"], ["train"]).urls[0]
    with tarfile.open(url) as source:
        members = [(m, source.extractfile(m).read()) for m in source.getmembers()]
    layouts = []
    for name, form in (("pax.tar", tarfile.PAX_FORMAT), ("gnu.tar", tarfile.GNU_FORMAT)):
        layouts.append(tmp_path / name)
        with tarfile.open(layouts[-1], "w", format=form) as out:
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE
            out.addfile(folder)
            for index, (member, streams) in enumerate(members):
                info = tarfile.TarInfo(("long/" * 30 if index >= 4 else "") + member.name)
                info.size = len(streams)
                out.addfile(info, io.BytesIO(streams))
    layouts.append(tmp_path / "zipped.tar.gz")
    layouts[-1].write_bytes(gzip.compress(Path(url).read_bytes()))
    for path in layouts:
        ours = [(m["fname"], m["data"], m["__url__"]) for m in tar_members(str(path))]
        assert len(ours) == len(members) and ours == webdataset_members(path), path.name


def test_a_corrupt_member_header_is_one_line_naming_the_shard(small_dataset, tmp_path):
    url = resolve_sets(small_dataset["shards"], small_dataset["manifest"], ["train"]).urls[0]
    with tarfile.open(url) as source:
        members = source.getmembers()
    keys = [m.name.split(".")[0] for m in members]
    middle = members[keys.index(keys[-1])].offset  # the last sample's first header: whole samples before it
    bad = tmp_path / "bad.tar"
    raw = bytearray(Path(url).read_bytes())
    raw[middle + 130] ^= 0x04  # one flipped bit in the size field: the header checksum no longer matches
    bad.write_bytes(bytes(raw))
    with pytest.raises(HpcdistillError, match=rf"^{bad}: truncated or corrupt shard \(.*\); last good sample: ") as err:
        list(raw_samples([str(bad)]))
    assert "last good sample: none" not in str(err.value)  # the samples before the bad header were read


def test_a_shard_cut_inside_a_member_header_is_refused(small_dataset, tmp_path):
    url = resolve_sets(small_dataset["shards"], small_dataset["manifest"], ["train"]).urls[0]
    with tarfile.open(url) as source:
        second = source.getmembers()[1].offset
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(url).read_bytes()[: second + 100])
    with pytest.raises(HpcdistillError, match=r"truncated or corrupt shard \(unexpected end of data\)"):
        list(raw_samples([str(cut)]))
