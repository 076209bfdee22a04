"""The GPU speed options on CPU (real loop, real shards): train.compile trains to the same weights and losses as the
default path, within float tolerance, and leaves checkpoints and exports unchanged in form; train.channels_last is
refused on CPU in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cfg_for

from hpcdistill.common.errors import HpcdistillError
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


def test_channels_last_is_refused_on_cpu_in_one_line(tiny_dataset, tmp_path):
    with pytest.raises(HpcdistillError) as err:
        loop.run(cfg_for(tiny_dataset, tmp_path, "nhwc", "baseline", 2.5, *STEPS, "train.channels_last=true"))
    assert str(err.value).startswith("train.channels_last: a GPU layout, refused on CPU") and "\n" not in str(err.value)
    assert not (tmp_path / "nhwc" / "checkpoints").exists()


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
