"""Config loading: safe YAML, overrides over file over defaults, one-line errors naming the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hpcdistill.config import Config, load_config
from hpcdistill.errors import HpcdistillError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_file_then_overrides(tmp_path):
    path = write(tmp_path, "c.yaml", "train: {lr: 1e-3, epochs: 7}\nmodel: {arch: resnet10}\n")
    cfg = load_config(path, ["train.epochs=9", "data.train=[aux1, aux2]", "train.pixel_resize=[maxpool]"])
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string; accepted for a float field
    assert cfg.train.epochs == 9  # CLI beats the file
    assert cfg.model.arch == "resnet10"  # file beats the default
    assert cfg.model.width == 64  # default kept
    assert cfg.data.train == ["aux1", "aux2"]
    assert cfg.train.pixel_resize == ["maxpool"]


def test_base_inheritance_deep_merges(tmp_path):
    write(tmp_path, "base.yaml", "train: {lr: 0.01, epochs: 3}\nrun: {name: parent}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ntrain: {epochs: 5}\n")
    cfg = load_config(child)
    assert (cfg.train.lr, cfg.train.epochs, cfg.run.name) == (0.01, 5, "parent")


@pytest.mark.parametrize("override, message", [
    (["train.lr=abc"], "train.lr: expected float, got 'abc'"),
    (["train.lrr=0.1"], "train.lrr: unknown key (did you mean train.lr?)"),
    (["train.mode=student"], "train.mode: expected one of teacher, baseline, distill, finetune; got 'student'"),
    (["precision=fp8"], "precision: expected one of auto, fp32, bf16, fp16; got 'fp8'"),
    (["train.epochs=1.5"], "train.epochs: expected int, got 1.5"),
    (["log.tensorboard=maybe"], "log.tensorboard: expected true/false, got 'maybe'"),
    (["train.pixel_resize=[maxpool, nearest]"], "train.pixel_resize[1]: expected maxpool or bicubic"),
    (["data.augment.hue=0.7"], "data.augment.hue: must be in [0, 0.5]"),
    (["train.mode=distill"], "teacher.checkpoint: required in distill mode"),
    (["nokey"], "override 'nokey': expected key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(HpcdistillError) as err:
        load_config(None, override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_file_and_unsafe_yaml(tmp_path):
    with pytest.raises(HpcdistillError, match=r"data\.augment\.flipz: unknown key \(did you mean data\.augment\.flips\?\)"):
        load_config(write(tmp_path, "a.yaml", "data: {augment: {flipz: true}}\n"))
    # safe_load refuses Python object tags instead of constructing them
    with pytest.raises(HpcdistillError, match="invalid YAML"):
        load_config(write(tmp_path, "b.yaml", "run: !!python/object/apply:os.system ['true']\n"))
    with pytest.raises(HpcdistillError, match="expected a mapping"):
        load_config(write(tmp_path, "c.yaml", "train: 3\n"))


def test_save_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=0.005", "run.name=x"])
    path = cfg.save(tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    assert isinstance(cfg, Config) and cfg.run_dir == Path("runs/x")


def test_shipped_configs_load():
    files = sorted(f for d in ("celiac", "luad", "demo") for f in (REPO / "configs" / d).rglob("*.yaml"))
    assert len(files) >= 20
    modes = {load_config(f).train.mode for f in files}
    assert modes == {"teacher", "baseline", "distill", "finetune"}
    ablations = {tuple(load_config(f).train.pixel_resize) for f in (REPO / "configs/luad/ablation").glob("*.yaml")}
    assert ablations == {(), ("maxpool",), ("bicubic",), ("maxpool", "bicubic")}
    assert load_config(REPO / "configs/luad/teacher.yaml").model.num_classes == 5
    assert load_config(REPO / "configs/celiac/teacher.yaml").model.num_classes == 3
    from hpcdistill.engine import build_ds_config

    jsons = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
    assert [p.stem for p in jsons] == ["bf16", "fp16", "fp32"]
    for path in jsons:  # every DeepSpeed file the configs can name is read and completed from the config
        ds = build_ds_config(load_config(None, [f"deepspeed={path}"]), world=1, on_cpu=False)
        assert ds["zero_optimization"]["stage"] == 0 and ds["gradient_accumulation_steps"] == 16
