"""The GPU speed options on CPU (real loop, real shards): train.channels_last and train.compile train to the same
weights and losses as the default path, within float tolerance, and leave checkpoints and exports unchanged in form."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cfg_for

from hpcdistill.train import loop

STEPS = ("train.epochs=2", "data.epoch_samples=4", "train.grad_accum=1")


def exported(summary: dict) -> dict[str, torch.Tensor]:
    return torch.load(Path(summary["last_path"]), map_location="cpu", weights_only=True)["state_dict"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()  # the same parameter names: no "_orig_mod." from torch.compile
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def default_distill(tiny_dataset, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    return loop.run(cfg_for(tiny_dataset, out, "default", "distill", 2.5, *STEPS, f"teacher.checkpoint={tiny_teacher}"))


def test_channels_last_trains_like_the_default(tiny_dataset, tiny_teacher, default_distill, tmp_path):
    fast = loop.run(
        cfg_for(
            tiny_dataset,
            tmp_path,
            "nhwc",
            "distill",
            2.5,
            *STEPS,
            "train.channels_last=true",
            f"teacher.checkpoint={tiny_teacher}",
        )
    )
    assert fast["global_step"] == default_distill["global_step"] == 8
    assert max_difference(exported(fast), exported(default_distill)) < 1e-4
    assert fast["val"]["loss"] == pytest.approx(default_distill["val"]["loss"], rel=1e-4)


@pytest.mark.slow
def test_compile_trains_like_the_default(tiny_dataset, tiny_teacher, default_distill, tmp_path):
    fast = loop.run(
        cfg_for(
            tiny_dataset,
            tmp_path,
            "compiled",
            "distill",
            2.5,
            *STEPS,
            "train.compile=true",
            f"teacher.checkpoint={tiny_teacher}",
        )
    )
    assert fast["global_step"] == 8
    assert max_difference(exported(fast), exported(default_distill)) < 1e-4
    assert fast["val"]["loss"] == pytest.approx(default_distill["val"]["loss"], rel=1e-4)
