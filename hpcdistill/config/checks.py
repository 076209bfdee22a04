"""The range and cross-field checks of the training config that its types cannot express, and which keys a mode
never reads: a value out of range is refused in one line naming its dotted key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpcdistill.common.errors import ConfigError

if TYPE_CHECKING:
    from hpcdistill.config.schema import Config


# What a mode never reads, with why (an override of one is said, never silently stored).
_DISTILL_ONLY = ("teacher.", "train.temperature", "train.pixel_resize")
UNUSED_BY_MODE: dict[str, tuple[tuple[str, ...], str]] = {
    "teacher": (("data.mag", *_DISTILL_ONLY), "the teacher sees data.teacher_mag; no teacher or distillation loss"),
    "baseline": (("data.teacher_mag", *_DISTILL_ONLY), "no teacher, no distillation loss"),
    "finetune": (("data.teacher_mag", *_DISTILL_ONLY), "no teacher, no distillation loss"),
    "distill": ((), ""),
}


def unused_in_mode(key: str, mode: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in UNUSED_BY_MODE[mode][0])


# Upper bounds the types cannot express: past them a value is a typo (an extra zero), not a setting.
UPPER_BOUNDS: dict[str, float] = {
    "train.epochs": 100_000,
    "train.max_epochs": 100_000,
    "train.patience": 100_000,
    "train.grad_accum": 65_536,
    "train.micro_batch": 4096,
    "train.keep_last": 1000,
    "train.bucket_window": 4096,
    "train.temperature": 1000.0,
    "model.width": 4096,
    "model.groups": 4096,
    "model.num_classes": 100_000,
    "data.num_workers": 256,
    "data.shuffle_buffer": 1_000_000,
    "data.epoch_passes": 10_000.0,
    "data.mag": 400.0,
    "data.teacher_mag": 400.0,
    "log.num_images": 64,
}


def _check_upper(cfg: Config) -> None:
    for key, bound in UPPER_BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value > bound:
            raise ConfigError(f"{key}: must be <= {bound:g}, got {value:g}")
    if cfg.data.shuffle_buffer < 1:
        raise ConfigError(f"data.shuffle_buffer: must be >= 1, got {cfg.data.shuffle_buffer}")
    if cfg.log.num_images < 0:
        raise ConfigError(f"log.num_images: must be >= 0, got {cfg.log.num_images}")


def check_config(cfg: Config) -> None:
    """Cross-field and range checks the types cannot express."""
    positive = {
        "train.epochs": cfg.train.epochs,
        "train.grad_accum": cfg.train.grad_accum,
        "train.micro_batch": cfg.train.micro_batch,
        "train.keep_last": cfg.train.keep_last,
        "model.width": cfg.model.width,
        "model.groups": cfg.model.groups,
        "model.num_classes": cfg.model.num_classes,
        "train.bucket_window": cfg.train.bucket_window,
        "log.log_every": cfg.log.log_every,
    }
    _at_least(positive, 1)
    non_negative = {
        "data.epoch_samples": cfg.data.epoch_samples,
        "data.num_workers": cfg.data.num_workers,
        "train.checkpoint_every_steps": cfg.train.checkpoint_every_steps,
        "train.max_steps": cfg.train.max_steps,
        "train.weight_decay": cfg.train.weight_decay,
        "log.images_every": cfg.log.images_every,
        "log.progress_every_s": cfg.log.progress_every_s,
        "train.checkpoint_every_min": cfg.train.checkpoint_every_min,
        "train.warmup_fraction": cfg.train.warmup_fraction,
        "train.patience": cfg.train.patience,
        "train.max_epochs": cfg.train.max_epochs,
        "teacher.min_val_accuracy": cfg.teacher.min_val_accuracy,
    }
    _at_least(non_negative, 0)
    _check_budget(cfg)
    _check_values(cfg)
    _check_upper(cfg)


def _check_budget(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    if not d.epoch_passes > 0:
        raise ConfigError(f"data.epoch_passes: must be > 0, got {d.epoch_passes}")
    if d.epoch_samples and d.epoch_passes != 1:
        raise ConfigError("data.epoch_passes: sizes an epoch only when data.epoch_samples is 0; set one of them")
    if t.patience and not d.val:
        raise ConfigError("train.patience: a plateau is seen on validation, and data.val is empty")
    if t.max_epochs and t.max_epochs < t.epochs:
        raise ConfigError(f"train.max_epochs: {t.max_epochs} is below train.epochs {t.epochs} (0 = no extension)")
    if t.max_epochs > t.epochs and not t.patience:
        raise ConfigError("train.max_epochs: an extension needs train.patience (it runs on while validation improves)")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if not 0 <= t.warmup_fraction < 1:
        raise ConfigError(f"train.warmup_fraction: a fraction of the steps in [0, 1), got {t.warmup_fraction}")
    if cfg.teacher.min_val_accuracy > 1:
        raise ConfigError(f"teacher.min_val_accuracy: a fraction in [0, 1], got {cfg.teacher.min_val_accuracy}")


def _check_values(cfg: Config) -> None:
    if not cfg.train.lr > 0:
        raise ConfigError(f"train.lr: must be > 0, got {cfg.train.lr}")
    if not cfg.train.temperature > 0:
        raise ConfigError(f"train.temperature: must be > 0, got {cfg.train.temperature}")
    for mag_key in ("mag", "teacher_mag"):
        if not getattr(cfg.data, mag_key) > 0:
            raise ConfigError(f"data.{mag_key}: must be > 0, got {getattr(cfg.data, mag_key)}")
    if len(set(cfg.train.pixel_resize)) != len(cfg.train.pixel_resize):
        raise ConfigError(f"train.pixel_resize: repeated entry in {cfg.train.pixel_resize}")
    _check_selection(cfg)
    aug = cfg.data.augment
    for name in ("brightness", "contrast", "saturation", "hed"):
        if not 0 <= getattr(aug, name) < 1:
            raise ConfigError(f"data.augment.{name}: must be in [0, 1), got {getattr(aug, name)}")
    if not 0 <= aug.hue <= 0.5:
        raise ConfigError(f"data.augment.hue: must be in [0, 0.5], got {aug.hue}")
    if cfg.train.mode == "distill" and not cfg.teacher.checkpoint:
        raise ConfigError("teacher.checkpoint: required in distill mode (the teacher run's best.pt)")
    if cfg.train.mode == "distill" and not (cfg.data.train or cfg.data.aux):
        raise ConfigError("data.train: distill needs data.train and/or data.aux sets")
    if cfg.train.mode == "finetune" and not cfg.model.init:
        raise ConfigError("model.init: required in finetune mode (the distilled student's best.pt)")
    if cfg.train.mode != "distill" and not cfg.data.train:
        raise ConfigError(f"data.train: {cfg.train.mode} mode needs labeled train sets")


def _check_selection(cfg: Config) -> None:
    """train.select_metric and train.export_also name metrics this run's validation will have."""
    train = cfg.train
    if not 0 <= train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1) (0 = no EMA), got {train.ema_decay}")
    if "auto" in train.export_also:
        raise ConfigError("train.export_also: name metrics; auto is what best.pt already uses")
    if len(set(train.export_also)) != len(train.export_also):
        raise ConfigError(f"train.export_also: repeated entry in {train.export_also}")
    named = [("train.select_metric", train.select_metric)] + [("train.export_also", m) for m in train.export_also]
    for key, metric in named:
        base = metric.removeprefix("ema_")
        if base in ("agreement", "kl") and train.mode != "distill":
            raise ConfigError(f"{key}: {metric} (with the teacher) exists only in distill mode, not {train.mode}")
        if metric != base and not train.ema_decay:
            raise ConfigError(f"{key}: {metric} scores the EMA weights; set train.ema_decay (e.g. 0.998)")


def _at_least(values: dict[str, float], low: float) -> None:
    for key, value in values.items():
        if value < low:
            raise ConfigError(f"{key}: must be >= {low}, got {value}")
