"""Stain normalisation through the real CLI: `shard --stain-norm` writes normalised pixels and records the method,
its reference and each slide's fit; the model `train` exports carries it; `evaluate`, `predict` and distillation
use it the same way and refuse, in one line, data or flags normalised otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MAGS, tiny_train_overrides
from PIL import Image
from shard_fixtures import read_samples

from hpcdistill.cli import main
from hpcdistill.config.loading import load_config
from hpcdistill.slides.stain import StainNorm

MAGS = ",".join(f"{m:g}" for m in TINY_MAGS)


def shard(dataset: dict, out: Path, *flags: str) -> dict:
    argv = ["shard", str(dataset["root"] / "slides"), "--labels", str(dataset["labels"]), "--mags", MAGS]
    assert main.main([*argv, "--out", str(out), "--no-progress", *flags]) == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def normalised(tiny_dataset, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stain")
    manifest = shard(tiny_dataset, root / "shards", "--stain-norm", "macenko")
    config = load_config(None, tiny_train_overrides(root / "shards", root / "runs", "teacher", "teacher"))
    assert main.main(["train", str(config.save(root / "teacher.yaml"))]) == 0
    return {"root": root, "manifest": manifest, "model": root / "runs" / "teacher" / "best.pt"}


@pytest.mark.slow
def test_shard_records_the_normalisation_and_each_slides_fit(tiny_dataset, normalised):
    manifest = normalised["manifest"]
    assert manifest["params"]["stain"]["method"] == "macenko" and len(manifest["params"]["stain"]["reference"]) == 8
    fits = {s: v["stain"] for s, v in manifest["slides"].items() if v["status"] == "ok"}
    assert fits and all(len(f) == 8 for f in fits.values())
    assert "stain" not in tiny_dataset["manifest"]["params"]  # none: the fingerprint as before the option
    plain, mapped = read_samples(tiny_dataset["shards"]), read_samples(normalised["root"] / "shards")
    assert sorted(plain) == sorted(mapped)  # the same windows, other colours
    assert all(not np.array_equal(plain[k]["10x.jpg"], mapped[k]["10x.jpg"]) for k in plain)


@pytest.mark.slow
def test_a_second_sites_stain_is_mapped_to_the_reference(tmp_path):
    """Slides of a second staining site (synth --site 1), fitted again on their shards' 10x pixels: Macenko's stain
    vectors and Reinhard's L*a*b* means are the reference's after normalisation, and were not before. (Macenko's
    maximum amounts and Reinhard's spreads depend on the resolution they are fitted at, so they are not compared.)"""
    synth(tmp_path / "site1", "--site", "1", "--seed", "3", train=3)
    synth(tmp_path / "site0", "--seed", "4", train=1)
    Image.fromarray(_reference_tile(tmp_path / "site0")).save(tmp_path / "site0.png")
    for method, compared in (("macenko", 6), ("reinhard", 3)):
        norm = StainNorm.fitted(method, tmp_path / "site0.png" if method == "reinhard" else None)
        distance = {}
        for flags in ([], ["--stain-norm", method, "--stain-reference", str(tmp_path / "site0.png")]):
            flags = flags[:2] if method == "macenko" else flags  # Macenko to its published reference
            out = tmp_path / f"{method}-{len(flags)}"
            argv = ["shard", str(tmp_path / "site1"), "--mags", "10", "--out", str(out), "--no-progress", *flags]
            assert main.main(argv) == 0
            pixels = np.concatenate([s["10x.jpg"].reshape(-1, 3) for s in read_samples(out).values()])
            fit = norm.fit_slide(pixels[:, None], np.ones((len(pixels), 1), bool), str(out))
            distance[bool(flags)] = float(np.abs(np.subtract(fit, norm.reference)[:compared]).max())
        assert distance[True] < 0.5 * distance[False], (method, distance)


def synth(out: Path, *flags: str, train: int) -> None:
    argv = ["synth", "--out", str(out), "--size", "1536x1152", "--aux1", "0", "--aux2", "0", *flags]
    assert main.main([*argv, "--slides-per-split", f"train={train},val=0,test=0"]) == 0


def _reference_tile(folder: Path) -> np.ndarray:
    from hpcdistill.slides.factory import open_slide

    with open_slide(sorted(folder.glob("*.svs"))[0]) as slide:
        return slide.read_at_mag((0, 0, slide.info.width, slide.info.height), 10.0, (384, 288))


@pytest.mark.slow
def test_the_model_carries_its_normalisation_to_evaluate_and_predict(tiny_dataset, normalised, tmp_path, capsys):
    model, shards = normalised["model"], normalised["root"] / "shards"
    out = tmp_path / "eval"
    assert main.main(["evaluate", str(model), "--shards", str(shards), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    refused = ["evaluate", str(model), "--shards", str(tiny_dataset["shards"]), "--out", str(tmp_path / "e2")]
    assert main.main([*refused, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stain normalisation macenko" in err[0] and "none" in err[0]

    slide = sorted((tiny_dataset["root"] / "slides").rglob("*.svs"))[0]
    assert main.main(["predict", str(model), str(slide), "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert summary["stain_norm"]["method"] == "macenko" and len(summary["slides"][0]["stain"]) == 8
    capsys.readouterr()
    argv = ["predict", str(model), str(slide), "--out", str(tmp_path / "p2"), "--stain-norm", "none"]
    assert main.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stain-norm none" in err[0] and "macenko" in err[0]
    assert not (tmp_path / "p2" / "predictions.json").exists()


@pytest.mark.slow
def test_a_student_cannot_distil_on_shards_normalised_otherwise(tiny_dataset, normalised, tmp_path, capsys):
    overrides = tiny_train_overrides(tiny_dataset["shards"], tmp_path, "student", "distill", 2.5)
    config = load_config(None, [*overrides, f"teacher.checkpoint={normalised['model']}"])
    capsys.readouterr()
    assert main.main(["train", str(config.save(tmp_path / "s.yaml"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("hpcdistill: error: teacher.checkpoint") and "stain normalisation" in err[0]
    )


def test_reinhard_needs_a_reference_and_says_so(tiny_dataset, tmp_path, capsys):
    argv = ["shard", str(tiny_dataset["root"] / "slides"), "--out", str(tmp_path / "s"), "--stain-norm", "reinhard"]
    assert main.main(argv) == 2
    assert "--stain-norm reinhard: needs --stain-reference" in capsys.readouterr().err
