"""The DeepSpeed config dict, generated from the typed config: the typed tree owns micro-batch, accumulation, lr,
weight decay and precision; the DeepSpeed JSON holds only what is DeepSpeed's own (optimizer betas/eps, clipping,
fp16 loss scaling, ZeRO stage 0 = plain data parallel). A JSON that sets an owned key is refused in one line, so
no setting has two sources that could disagree."""

from __future__ import annotations

from typing import Any

from hpcdistill.common.errors import TrainError
from hpcdistill.common.files import read_json
from hpcdistill.common.typed_tree import walk_dotted
from hpcdistill.config.schema import Config, resolve_path
from hpcdistill.train.budget import scheduler_config

# DeepSpeed key (dotted) -> the typed config key that owns it
OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch x train.grad_accum x ranks",
    "optimizer.params.lr": "train.lr",
    "optimizer.params.weight_decay": "train.weight_decay",
    "bf16.enabled": "precision",
    "fp16.enabled": "precision",
    "amp": "precision",
    "scheduler": "train.schedule",
}


def read_ds_json(path_text: str) -> dict[str, Any]:
    """The DeepSpeed JSON named by `deepspeed`, refusing keys the typed config owns."""
    path = resolve_path(path_text)
    ds = read_json(path, TrainError, label=f"deepspeed: {path}")
    if not isinstance(ds, dict):
        raise TrainError(f"deepspeed: {path}: expected a JSON object")
    for key, _ in walk_dotted(ds):
        if key in OWNED_KEYS:
            raise TrainError(
                f"deepspeed: {path}: sets {key}, which the config owns ({OWNED_KEYS[key]}); "
                "remove it from the JSON and set it in the config"
            )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != 0:
        raise TrainError(f"deepspeed: {path}: zero_optimization.stage must be 0 (plain data parallel), got {stage}")
    return ds


def build_ds_config(cfg: Config, world: int, on_cpu: bool, steps_per_epoch: int) -> dict[str, Any]:
    """The dict `deepspeed.initialize` gets for this run on `world` ranks, `steps_per_epoch` optimizer steps each
    epoch (the schedule's horizon)."""
    ds = read_ds_json(cfg.deepspeed)
    t = cfg.train
    if cfg.precision == "fp16" and on_cpu:
        raise TrainError("precision: fp16 is not supported on CPU; use bf16 or fp32")
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch * t.grad_accum * world
    ds.setdefault("gradient_clipping", 0.0)  # DeepSpeed would clip at 1.0 otherwise
    opt = ds.setdefault("optimizer", {"type": "Adam", "params": {}})
    opt.setdefault("params", {})
    opt["params"].update(lr=t.lr, weight_decay=t.weight_decay)
    opt["params"].setdefault("torch_adam", True)  # no fused C++ op to compile
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.precision == "fp16"}
    scheduler = scheduler_config(cfg, steps_per_epoch)
    if scheduler is not None:
        ds["scheduler"] = scheduler
    return ds
