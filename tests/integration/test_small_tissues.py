"""Tissues too small for the network: `shard` skips and counts them (--min-side, by default the default network's
smallest input), and `train` refuses shards holding a sample under its own network's smallest input, in one line."""

from __future__ import annotations

import json

from conftest import cfg_for
from train_helpers import error_line

from hpcdistill.cli import main
from hpcdistill.synthetic import dataset as synthetic


def test_shard_skips_and_counts_the_tissues_under_min_side(tmp_path, capsys):
    slide = tmp_path / "a.tiff"
    synthetic.write_slide(slide, synthetic.SlideSpec(3072, 2048, fmt="tiff", base_mag=40, class_id=0, seed=1))
    argv = [str(slide), "--mags", "10,1.25", "--no-progress"]
    assert main.main(["shard", *argv, "--out", str(tmp_path / "all")]) == 0
    every = json.loads((tmp_path / "all" / "manifest.json").read_text())
    assert every["slides"]["a"]["small_tissues"] == 0 and every["params"].get("min_side") is None  # auto = 1 px
    median = int(every["sizes"]["1.25x"]["median"][0])
    capsys.readouterr()
    assert main.main(["shard", *argv, "--out", str(tmp_path / "some"), "--min-side", str(median)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    some = json.loads((tmp_path / "some" / "manifest.json").read_text())
    small = some["slides"]["a"]["small_tissues"]
    assert 0 < small < every["slides"]["a"]["tissues"] and some["slides"]["a"]["tissues"] + small == 3
    assert line.endswith(f"; {small} tissue(s) under {median} px skipped (--min-side)")
    assert some["sizes"]["1.25x"]["min_side"] >= median > every["sizes"]["1.25x"]["min_side"]


def test_train_refuses_shards_with_a_sample_smaller_than_its_network_takes(tiny_dataset, tmp_path, capsys):
    """One channel per GroupNorm group takes no input under 3 px; the tiny set holds a 2 px sample at 1.25x (cut
    through the API, whose min_side is 1). Before the check this crashed mid-epoch in a forward pass."""
    narrow = ("model.width=8", "model.groups=8", "model.stem=halfres", "data.epoch_samples=2", "train.max_steps=1")
    config = cfg_for(tiny_dataset, tmp_path, "narrow", "baseline", 1.25, *narrow).save(tmp_path / "narrow.yaml")
    assert tiny_dataset["manifest"]["sizes"]["1.25x"]["min_side"] == 2
    assert main.main(["train", str(config)]) == 2
    assert error_line(capsys) == (
        f"hpcdistill: error: {tiny_dataset['shards']}: its smallest sample is 2 px a side at 1.25x, under the 3 px "
        "the network takes; shard again with --min-side 3 (or a wider model)"
    )
