"""The stain jitter (`augment.hed`): each stain's optical density scaled and shifted exactly as drawn, one draw for
both images of a KD pair, and nothing drawn (the other moves unchanged) when it is off."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from handmade_shards import spec

from hpcdistill.common.errors import ConfigError
from hpcdistill.config.loading import load_config
from hpcdistill.config.schema import AugmentConfig
from hpcdistill.data.augment import _HED_TO_OD, AugmentDraw
from hpcdistill.data.device_batch import stain_moved
from hpcdistill.data.streams import ShardStream, StreamSpec
from hpcdistill.shards.reader import resolve_sets


def draw(scale=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0)) -> AugmentDraw:
    return AugmentDraw(False, False, 0, 1.0, 1.0, 1.0, 0.0, hed_scale=scale, hed_shift=shift)


def stained(amounts: np.ndarray) -> torch.Tensor:
    """A (1, 3, h, w) float image on the 0..255 scale holding the stain amounts (h, w, 3): v = 256 e^-od - 1."""
    density = amounts @ _HED_TO_OD
    return torch.from_numpy(256.0 * np.exp(-density) - 1.0).permute(2, 0, 1)[None].float()


def test_an_identity_draw_gives_the_image_back():
    image = torch.randint(0, 256, (2, 3, 17, 23), dtype=torch.uint8)
    maps = torch.from_numpy(np.stack([draw().stain_map()] * 2))
    assert (stain_moved(image, maps) - image.float()).abs().max() < 2e-3


def test_each_stain_is_scaled_and_shifted_as_drawn():
    rng = np.random.default_rng(0)
    amounts = rng.uniform(0.0, 1.2, (8, 9, 3)) * [1.0, 1.0, 0.0]  # haematoxylin and eosin, no DAB
    image = stained(amounts)
    scale, shift = (1.3, 0.8, 1.0), (0.05, -0.02, 0.0)
    moved = stain_moved(
        image.round().clamp(0, 255).to(torch.uint8), torch.from_numpy(draw(scale, shift).stain_map()[None])
    )
    expected = stained(amounts * scale + shift).clamp(0, 255)
    assert (moved - expected).abs().max() < 1.5  # the uint8 rounding of the input, carried through the exp
    # only haematoxylin scaled: the image darkens along haematoxylin's direction, eosin's amounts unchanged
    only_h = stain_moved(image.round().to(torch.uint8), torch.from_numpy(draw((1.5, 1.0, 1.0)).stain_map()[None]))
    back = -torch.log((only_h[0].permute(1, 2, 0).double() + 1) / 256).numpy() @ np.linalg.inv(_HED_TO_OD)
    assert np.allclose(back[..., 1], amounts[..., 1], atol=0.02) and np.allclose(
        back[..., 0], 1.5 * amounts[..., 0], atol=0.03
    )


def test_off_draws_nothing_and_leaves_the_other_moves_as_they_were():
    aug = AugmentConfig()
    plain = AugmentDraw.sample(aug, random.Random(3))
    with_stain = AugmentDraw.sample(AugmentConfig(hed=0.1), random.Random(3))
    assert plain.hed_scale == (1.0, 1.0, 1.0) and plain.hed_shift == (0.0, 0.0, 0.0)
    assert (with_stain.moves, with_stain.brightness, with_stain.hue) == (plain.moves, plain.brightness, plain.hue)
    assert all(0.9 <= s <= 1.1 for s in with_stain.hed_scale) and with_stain.hed_scale != plain.hed_scale


def test_both_images_of_a_pair_get_one_stain_move(tiny_dataset):
    shards, manifest = tiny_dataset["shards"], tiny_dataset["manifest"]
    stats = {name: manifest["stats"][name] for name in ("10x", "2.5x")}
    kwargs = dict(urls=resolve_sets(shards, manifest, ["train"]).urls, mode="paired", mag=2.5, teacher_mag=10.0)
    kwargs |= dict(stats=stats, micro_batch=1, samples=-1, seed=5, finish_on_device=True)
    loose = list(ShardStream(StreamSpec(augment=AugmentConfig(hed=0.2), **kwargs)))
    assert all(torch.equal(b["x_hed"], b["t_hed"]) for b in loose)
    assert len({tuple(b["x_hed"].flatten().tolist()) for b in loose}) == len(loose)  # a new draw per sample
    from hpcdistill.data.device_batch import finish_batch

    def unstandardise(x, s):
        return x * torch.tensor(s["std"]).view(3, 1, 1) + torch.tensor(s["mean"]).view(3, 1, 1)

    for b in loose:  # the pair still agrees pixel for pixel after the move: the same stains moved in both
        done = finish_batch(b)
        x, t = unstandardise(done["x"][0], stats["2.5x"]), unstandardise(done["t"][0], stats["10x"])
        assert float((F.adaptive_avg_pool2d(t, x.shape[1:]) - x).abs().mean()) < 0.06


def test_a_stain_strength_out_of_range_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"data.augment.hed: must be in \[0, 1\), got 1.5"):
        load_config("configs/demo/teacher.yaml", ["data.augment.hed=1.5", f"run.out_dir={tmp_path}"])


def test_spec_helper_is_unchanged_by_the_option(small_dataset):
    batches = list(ShardStream(spec(small_dataset["shards"], "train", samples=2, micro_batch=1, seed=1)))
    assert all("x_hed" not in b for b in batches)  # off by default: no stain map shipped


@pytest.mark.slow
def test_a_student_distils_with_the_stain_jitter_through_the_cli(tiny_dataset, tiny_teacher, tmp_path):
    from conftest import cfg_for

    from hpcdistill.cli import main

    path = cfg_for(tiny_dataset, tmp_path, "hed", "distill", 2.5, f"teacher.checkpoint={tiny_teacher}")
    path = path.save(tmp_path / "c.yaml")
    assert main.main(["train", str(path), "data.augment.hed=0.1"]) == 0
    run = tmp_path / "hed"
    resolved = (run / "config.yaml").read_text()
    assert "hed: 0.1" in resolved
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(math.isfinite(v) for line in lines for v in line.values() if isinstance(v, float))
