"""The paired augmentation draw and the batch finished where the model runs: pairs stay aligned, the folded colour
map equals its stepwise definition, decoding on the device gives the loader's tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from handmade_shards import handmade, spec

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.config.schema import AugmentConfig
from hpcdistill.data.augment import AugmentDraw, apply_moves
from hpcdistill.data.device_batch import finish_batch, require_device_decode
from hpcdistill.data.streams import ShardStream, StreamSpec
from hpcdistill.shards.reader import decode_sample, raw_samples, resolve_sets

CLASSES = ["celiac", "duodenitis", "normal"]
STATS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


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
        assert set(later) == set(f) == {"key", "slide", "tissue", "area", "y", "x", "t"}
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
