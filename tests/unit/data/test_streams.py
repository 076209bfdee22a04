"""Per-rank streams on real shards (conftest's `small_dataset`, cut by the sharder) and hand-made ones where a test
needs chosen samples: equal steps per rank, an exact validation split, single passes, resume skips, loader workers."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from handmade_shards import handmade, keys, shard_counts, spec, split_keys

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.config.schema import AugmentConfig
from hpcdistill.data.streams import ShardStream, make_loader, per_rank_samples
from hpcdistill.shards.manifest import read_manifest
from hpcdistill.shards.reader import decode_sample, raw_samples, resolve_sets

CLASSES = ["celiac", "duodenitis", "normal"]
STATS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


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
