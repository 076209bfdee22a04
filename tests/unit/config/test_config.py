"""Config loading: safe YAML, overrides over file over defaults, one-line errors naming the dotted key; the DeepSpeed
dict built from it, with the DeepSpeed JSON refused where it sets a key the typed config owns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hpcdistill.common.errors import HpcdistillError, TrainError
from hpcdistill.config.loading import load_config
from hpcdistill.config.schema import Config
from hpcdistill.train.ds_config import OWNED_KEYS, build_ds_config, read_ds_json

REPO = Path(__file__).resolve().parents[3]


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
    assert cfg.precision == "fp32" and cfg.deepspeed == "configs/deepspeed/zero0.json"  # the documented defaults


def test_base_inheritance_deep_merges(tmp_path):
    write(tmp_path, "base.yaml", "train: {lr: 0.01, epochs: 3}\nrun: {name: parent}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ntrain: {epochs: 5}\n")
    cfg = load_config(child)
    assert (cfg.train.lr, cfg.train.epochs, cfg.run.name) == (0.01, 5, "parent")


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.lr=abc"], "train.lr: expected float, got 'abc'"),
        (["train.lrr=0.1"], "train.lrr: unknown key (did you mean train.lr?)"),
        (["train.mode=student"], "train.mode: expected one of teacher, baseline, distill, finetune; got 'student'"),
        (["precision=fp8"], "precision: expected one of fp32, bf16, fp16; got 'fp8'"),
        (["precision=auto"], "precision: expected one of fp32, bf16, fp16; got 'auto'"),  # no longer a choice
        (["train.epochs=1.5"], "train.epochs: expected int, got 1.5"),
        (["log.tensorboard=maybe"], "log.tensorboard: expected true/false, got 'maybe'"),
        (
            ["train.pixel_resize=[maxpool, nearest]"],
            "train.pixel_resize[1]: expected one of maxpool, bicubic; got 'nearest'",
        ),
        (["data.augment.hue=0.7"], "data.augment.hue: must be in [0, 0.5]"),
        (["train.mode=distill"], "teacher.checkpoint: required in distill mode"),
        (["train.select_metric=acuracy"], "got 'acuracy' (did you mean accuracy?)"),
        (
            ["train.select_metric=ema_kl", "train.mode=distill", "teacher.checkpoint=t.pt"],
            "train.select_metric: ema_kl scores the EMA weights; set train.ema_decay",
        ),
        (["train.export_also=kl"], "train.export_also: kl (with the teacher) exists only in distill mode, not teacher"),
        (["train.export_also=[loss,loss]"], "train.export_also: repeated entry in ['loss', 'loss']"),
        (["train.export_also=auto"], "train.export_also: name metrics; auto is what best.pt already uses"),
        (["train.ema_decay=1.0"], "train.ema_decay: must be in [0, 1) (0 = no EMA), got 1.0"),
        (
            ["train.select_metric=agreement"],
            "train.select_metric: agreement (with the teacher) exists only in distill mode, not teacher",
        ),
        (
            ["train.mode=baseline", "train.select_metric=agreement"],
            "train.select_metric: agreement (with the teacher) exists only in distill mode, not baseline",
        ),
        (["nokey"], "override 'nokey': expected key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(HpcdistillError) as err:
        load_config(None, override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_select_metric_typo_in_a_file_is_refused_at_load(tmp_path):
    path = write(tmp_path, "c.yaml", "train: {mode: finetune, select_metric: F1}\nmodel: {init: x.pt}\n")
    with pytest.raises(HpcdistillError, match=r"^train\.select_metric: expected one of .*; got 'F1'$"):
        load_config(path)


@pytest.mark.parametrize(
    "overrides, metric",
    [
        ([], "accuracy"),
        (["train.mode=distill", "teacher.checkpoint=t.pt"], "loss"),
        (["train.mode=baseline", "train.ema_decay=0.998"], "ema_accuracy"),
        (["train.mode=distill", "teacher.checkpoint=t.pt", "train.ema_decay=0.998"], "loss"),
        (["train.mode=distill", "teacher.checkpoint=t.pt", "train.select_metric=f1"], "f1"),
        (["train.mode=distill", "teacher.checkpoint=t.pt", "train.select_metric=agreement"], "agreement"),
        (["train.mode=baseline", "train.select_metric=recall"], "recall"),
    ],
)
def test_select_metric_resolves_auto_by_mode(overrides, metric):
    assert load_config(None, overrides).select_metric == metric


def test_model_mag_is_the_teacher_mag_only_in_teacher_mode():
    assert load_config(None, ["data.mag=1.25", "data.teacher_mag=20"]).model_mag == 20.0
    for mode in (
        ["train.mode=baseline"],
        ["train.mode=distill", "teacher.checkpoint=t.pt"],
        ["train.mode=finetune", "model.init=s.pt"],
    ):
        assert load_config(None, mode + ["data.mag=1.25", "data.teacher_mag=20"]).model_mag == 1.25, mode


def test_unknown_key_in_file_and_unsafe_yaml(tmp_path):
    with pytest.raises(
        HpcdistillError, match=r"data\.augment\.flipz: unknown key \(did you mean data\.augment\.flips\?\)"
    ):
        load_config(write(tmp_path, "a.yaml", "data: {augment: {flipz: true}}\n"))
    # safe_load refuses Python object tags instead of constructing them
    with pytest.raises(HpcdistillError, match="invalid YAML"):
        load_config(write(tmp_path, "b.yaml", "run: !!python/object/apply:os.system ['true']\n"))
    with pytest.raises(HpcdistillError, match="expected a mapping"):
        load_config(write(tmp_path, "c.yaml", "train: 3\n"))


def test_save_round_trips(tmp_path):
    # away from every default that could hide a lossy save: nested lists, literals, a numeric-looking name, floats
    changed = [
        "train.lr=0.005",
        "run.name=42",
        "train.mode=distill",
        "teacher.checkpoint=runs/t/best.pt",
        "data.train=[]",
        "data.aux=[aux1, aux2]",
        "data.val=[val, 'extra-{000000..000002}.tar']",
        "train.pixel_resize=[bicubic]",
        "precision=bf16",
        "data.augment.hue=0.125",
        "data.augment.rot90=false",
        "train.select_metric=f1",
        "model.stem=lowres",
        "data.mag=1.25",
        "train.checkpoint_every_min=0.5",
    ]
    cfg = load_config(None, changed)
    default = Config().to_dict()
    path = cfg.save(tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict() and again == cfg
    assert again.data.val == ["val", "extra-{000000..000002}.tar"] and again.data.train == []
    assert again.train.pixel_resize == ["bicubic"] and again.precision == "bf16" and again.run.name == "42"
    assert again.to_dict() != default and again.run_dir == Path("runs/42")
    # the saved file is plain YAML data (no Python tags), whole, in the config's own nesting
    text = path.read_text()
    assert "!!" not in text and yaml.safe_load(text) == cfg.to_dict()
    # an edit of the saved file is what a reload sees, and an override still wins over the file
    raw = yaml.safe_load(text)
    raw["train"]["epochs"] = 7
    raw["data"]["augment"]["brightness"] = 0.1
    path.write_text(yaml.safe_dump(raw))
    edited = load_config(path, ["train.lr=0.02"])
    assert (edited.train.epochs, edited.data.augment.brightness, edited.train.lr) == (7, 0.1, 0.02)
    assert edited.data.aux == ["aux1", "aux2"] and edited.train.select_metric == "f1"


def test_shipped_configs_load():
    files = sorted(f for d in ("celiac", "luad", "demo") for f in (REPO / "configs" / d).rglob("*.yaml"))
    assert len(files) >= 20
    modes = {load_config(f).train.mode for f in files}
    assert modes == {"teacher", "baseline", "distill", "finetune"}
    ablations = {tuple(load_config(f).train.pixel_resize) for f in (REPO / "configs/luad/ablation").glob("*.yaml")}
    assert ablations == {(), ("maxpool",), ("bicubic",), ("maxpool", "bicubic")}
    assert load_config(REPO / "configs/luad/teacher.yaml").model.num_classes == 5
    assert load_config(REPO / "configs/celiac/teacher.yaml").model.num_classes == 3
    # every DeepSpeed file the shipped configs name is read (no owned key in it) and completed from the config
    named = {load_config(f).deepspeed for f in files}
    jsons = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
    assert [p.stem for p in jsons] == ["zero0"] and named == {"configs/deepspeed/zero0.json"}
    for f in files:
        cfg = load_config(f)
        ds = build_ds_config(cfg, world=1, on_cpu=False, steps_per_epoch=10)
        assert ds["zero_optimization"]["stage"] == 0
        assert ds["gradient_accumulation_steps"] == cfg.train.grad_accum
        assert ds["bf16"]["enabled"] == (cfg.precision == "bf16") and not ds["fp16"]["enabled"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_ds_config_takes_every_owned_value_from_the_typed_config(precision):
    cfg = load_config(
        None,
        [
            f"precision={precision}",
            "train.micro_batch=2",
            "train.grad_accum=3",
            "train.lr=0.0025",
            "train.weight_decay=0.01",
        ],
    )
    ds = build_ds_config(cfg, world=4, on_cpu=False, steps_per_epoch=10)
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (2, 3, 24)  # 2 x 3 x 4 ranks
    assert ds["optimizer"]["params"]["lr"] == 0.0025 and ds["optimizer"]["params"]["weight_decay"] == 0.01
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999]  # DeepSpeed's own settings come from the JSON
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (precision == "bf16", precision == "fp16")
    assert ds["fp16"]["initial_scale_power"] == 16  # the JSON's loss scaling survives beside the enabled flag
    assert ds["gradient_clipping"] == 0.0
    if precision == "fp16":
        with pytest.raises(TrainError, match=r"^precision: fp16 is not supported on CPU; use bf16 or fp32$"):
            build_ds_config(cfg, world=1, on_cpu=True, steps_per_epoch=10)
    else:
        assert build_ds_config(cfg, world=1, on_cpu=True, steps_per_epoch=10)["train_batch_size"] == 6


@pytest.mark.parametrize(
    "ds_json, key",
    [
        ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu"),
        ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps"),
        ({"train_batch_size": 64}, "train_batch_size"),
        ({"optimizer": {"type": "Adam", "params": {"lr": 0.1, "betas": [0.9, 0.99]}}}, "optimizer.params.lr"),
        ({"optimizer": {"type": "Adam", "params": {"weight_decay": 0.1}}}, "optimizer.params.weight_decay"),
        ({"bf16": {"enabled": True}}, "bf16.enabled"),
        ({"fp16": {"enabled": True, "loss_scale": 0}}, "fp16.enabled"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ],
)
def test_deepspeed_json_setting_an_owned_key_is_refused_in_one_line(tmp_path, ds_json, key):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}, **ds_json}))
    cfg = load_config(None, [f"deepspeed={path}"])  # loading is fine: the JSON is read when DeepSpeed's dict is built
    with pytest.raises(TrainError) as err:
        build_ds_config(cfg, world=1, on_cpu=True, steps_per_epoch=10)
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"deepspeed: {path}: sets {key}, which the config owns ({OWNED_KEYS[key]}); "
        "remove it from the JSON and set it in the config"
    )
    owner = {
        "train_micro_batch_size_per_gpu": "train.micro_batch",
        "gradient_accumulation_steps": "train.grad_accum",
        "optimizer.params.lr": "train.lr",
        "optimizer.params.weight_decay": "train.weight_decay",
        "bf16.enabled": "precision",
        "fp16.enabled": "precision",
    }.get(key)
    assert owner is None or f"({owner})" in message  # the config key to set instead, by name


def test_deepspeed_json_keeps_its_own_keys_and_refuses_bad_files(tmp_path):
    own = tmp_path / "own.json"
    own.write_text(
        json.dumps(
            {
                "optimizer": {"type": "Adam", "params": {"eps": 1e-6}},
                "gradient_clipping": 1.0,
                "bf16": {"immediate_grad_update": True},
                "zero_optimization": {"stage": 0},
            }
        )
    )
    ds = build_ds_config(
        load_config(None, [f"deepspeed={own}", "precision=bf16"]), world=1, on_cpu=True, steps_per_epoch=10
    )
    assert ds["optimizer"]["params"]["eps"] == 1e-6 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"immediate_grad_update": True, "enabled": True}
    assert read_ds_json(str(own)) == json.loads(own.read_text())  # reading never edits the file's dict
    cases = {
        "stage2.json": ('{"zero_optimization": {"stage": 2}}', r"zero_optimization\.stage must be 0 .*got 2$"),
        "broken.json": ('{"optimizer": ', r"invalid JSON \(Expecting value at line 1\)$"),
        "list.json": ("[1, 2]", r"expected a JSON object$"),
    }
    for name, (text, pattern) in cases.items():
        path = write(tmp_path, name, text)
        with pytest.raises(TrainError, match=rf"^deepspeed: {path}: {pattern}"):
            build_ds_config(load_config(None, [f"deepspeed={path}"]), world=1, on_cpu=True, steps_per_epoch=10)
    with pytest.raises(TrainError, match=rf"^deepspeed: {tmp_path / 'missing.json'}: not found$"):
        build_ds_config(
            load_config(None, [f"deepspeed={tmp_path / 'missing.json'}"]), world=1, on_cpu=True, steps_per_epoch=10
        )
