"""Inputs checked before use, each through the real CLI or reader on folders the real sharder wrote: an edited
manifest (a class removed, a count raised, a shard entry outside the folder, a shard replaced), slide names whose
sample keys would collide, an aux set holding a scored patient, and a YAML file whose aliases explode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_train_overrides
from train_helpers import error_line

from hpcdistill.cli import main
from hpcdistill.common.errors import ConfigError, DataError
from hpcdistill.config.loading import load_config
from hpcdistill.shards.manifest import read_manifest


def edited_copy(ref: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(ref, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def drop_class(m: dict) -> None:
    m["classes"] = m["classes"][:-1]


def raise_count(m: dict) -> None:
    m["splits"]["train"]["samples"] += 5


def escape_folder(m: dict) -> None:
    m["splits"]["train"]["shards"] = ["../outside.tar"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (drop_class, " counts class 'tumor', not in classes [normal]"),
        (raise_count, "split train has "),
        (escape_folder, "split train lists shard '../outside.tar': entries are plain file names in "),
    ],
)
def test_an_edited_manifest_is_refused_in_one_line(shard_slides, tmp_path, edit, message):
    shards = edited_copy(shard_slides["ref"], tmp_path, edit)
    with pytest.raises(DataError) as err:
        read_manifest(shards)
    assert str(err.value).startswith(f"{shards / 'manifest.json'}: ") and message in str(err.value)


def test_a_raised_count_with_consistent_classes_is_caught_by_the_shards_record(shard_slides, tmp_path):
    def raise_both(m: dict) -> None:
        raise_count(m)
        label = next(c for c, n in m["splits"]["train"]["class_histogram"].items() if n)
        m["splits"]["train"]["class_histogram"][label] += 5

    with pytest.raises(DataError, match=r"split train says \d+ samples, its shards hold \d+$"):
        read_manifest(edited_copy(shard_slides["ref"], tmp_path, raise_both))


def test_shards_remade_at_the_same_path_are_not_resumed(tiny_dataset, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_dataset["shards"], shards)
    overrides = tiny_train_overrides(shards, tmp_path, "same-path", "baseline", 2.5)
    config = load_config(None, [*overrides, "data.epoch_samples=8"]).save(tmp_path / "run.yaml")
    assert main.main(["train", str(config), "train.max_steps=2"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["params"]["seed"] = 1  # other slides, splits or parameters: another manifest at the same path
    (shards / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main.main(["train", str(config)]) == 2
    line = error_line(capsys)
    assert f"data.shards: {shards} is not the data " in line and "the shards were re-made or replaced" in line


def test_slide_names_whose_keys_would_collide_are_refused_naming_both(shard_slides, tmp_path, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("x,y.tiff", "x y.tiff"):
        shutil.copy(shard_slides["good"] / "s40a.tiff", folder / name)
    assert main.main(["shard", str(folder), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    line = error_line(capsys)
    assert "would share their keys (x-y_t...)" in line and str(folder / "x y.tiff") in line
    assert str(folder / "x,y.tiff") in line and not (tmp_path / "out").exists()


def test_an_aux_slide_of_a_scored_patient_is_refused_unless_allowed(shard_slides, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,patient,label,split\ns40a,P1,a,test\ns40b,P2,b,train\nu1,P1,,aux\n")
    slides = [str(shard_slides["good"] / n) for n in ("s40a.tiff", "s40b.svs", "u1.tiff")]
    command = ["shard", *slides, "--labels", str(labels), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main.main(command) == 2
    assert error_line(capsys) == (
        f"hpcdistill: error: {labels}:4: patient 'P1' has slide u1 in aux and s40a in test: an aux set would train "
        "on a scored patient; give the aux slide another patient, or pass --aux-shares-patients if that set is never "
        "scored against"
    )
    assert main.main([*command, "--aux-shares-patients"]) == 0


def test_a_yaml_file_whose_aliases_explode_is_refused_without_expanding_it(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\ntrain: {lr: *i}\n")  # 10^9 values once expanded
    with pytest.raises(ConfigError) as err:
        load_config(bomb)
    assert str(err.value) == f"{bomb.resolve()}: more than 100,000 values once its anchors and aliases are expanded"
    wide = tmp_path / "wide.yaml"
    wide.write_text("train: {lr: [" + ", ".join(["1"] * 5000) + "]}\n")
    with pytest.raises(ConfigError) as err:
        load_config(wide)
    assert len(str(err.value)) < 200 and str(err.value).startswith("train.lr: expected float, got [1, 1, 1")
