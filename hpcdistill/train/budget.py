"""A run's budget and when it ends: how many optimizer steps it has and how that number was derived, the learning-rate
schedule over those steps (DeepSpeed's WarmupCosineLR, stepped by the engine at every optimizer step and saved in its
checkpoints, so a resume continues it exactly), and the stop rule: the budget, a validation plateau
(`train.patience`) or an extension to `train.max_epochs` while validation still improves."""

from __future__ import annotations

from typing import Any

from hpcdistill.config.schema import Config

# Settings that shape the schedule: changing one on resume would bend the curve the run is on (refused).
SCHEDULE_KEYS = ("train.epochs", "train.lr")


def scheduled(cfg: Config) -> bool:
    """True when the lr changes over the run (a warm-up, a decay): DeepSpeed then owns it, step by step."""
    return cfg.train.schedule != "constant" or cfg.train.warmup_fraction > 0


def epoch_samples(cfg: Config, labelled: int, selected: int) -> tuple[int, str]:
    """Samples per epoch over all ranks, and how that count was derived (for the budget line)."""
    d = cfg.data
    if d.epoch_samples:
        return d.epoch_samples, f"data.epoch_samples={d.epoch_samples}"
    if labelled:
        return max(1, round(d.epoch_passes * labelled)), (
            f"{d.epoch_passes:g} pass(es) over the {labelled} labelled train tissues of data.train"
        )
    return max(1, round(d.epoch_passes * selected)), f"{d.epoch_passes:g} pass(es) over the {selected} aux samples"


def warmup_steps(cfg: Config, steps_per_epoch: int) -> int:
    return round(cfg.train.warmup_fraction * cfg.train.epochs * steps_per_epoch)


def scheduler_config(cfg: Config, steps_per_epoch: int) -> dict[str, Any] | None:
    """DeepSpeed's `scheduler` entry, or None for a constant lr without warm-up (the paper's). The linear warm-up
    starts at 0 (the first step only fills Adam's moments, as most warm-ups do); a cosine decay ends at
    lr x min_lr_ratio after train.epochs and stays there through an extension."""
    t = cfg.train
    if not scheduled(cfg):
        return None
    total, warmup = t.epochs * steps_per_epoch, warmup_steps(cfg, steps_per_epoch)
    if t.schedule == "constant":
        kind = "WarmupLR"
        params = {"warmup_min_lr": 0.0, "warmup_max_lr": t.lr, "warmup_num_steps": max(1, warmup)}
    else:
        kind = "WarmupCosineLR"
        params = {
            "total_num_steps": total,
            "warmup_num_steps": max(1, warmup),
            "warmup_min_ratio": 0.0 if warmup else 1.0,  # no warm-up: the two steps DeepSpeed keeps are at full lr
            "cos_min_ratio": t.min_lr_ratio,
        }
    return {"type": kind, "params": {**params, "warmup_type": "linear"}}


def start_schedule(engine: Any) -> None:
    """A new run's first scheduler step: DeepSpeed sets the lr only after each optimizer step, so without it the first
    two steps would both run at the warm-up's start. A resume loads the scheduler's position instead."""
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step()


def budget_line(cfg: Config, steps_per_epoch: int, per_rank: int, world: int, derivation: str) -> str:
    """What the run will do, said before it starts: steps, how the epoch was sized, the schedule and the stop rule."""
    t = cfg.train
    line = (
        f"budget: {t.epochs} epochs x {steps_per_epoch} optimizer steps = {t.epochs * steps_per_epoch} steps "
        f"(an epoch: {derivation}; {per_rank} samples per rank = micro-batch {t.micro_batch} x accumulation "
        f"{t.grad_accum} x {steps_per_epoch} steps, on {world} rank(s)); lr {t.lr:g}"
    )
    warmup = warmup_steps(cfg, steps_per_epoch)
    line += f", {warmup} warm-up steps" if warmup else ""
    line += f", cosine to {t.lr * t.min_lr_ratio:g}" if t.schedule == "cosine" else ", constant"
    if t.patience:
        line += f"; stops after {t.patience} validations without a better {cfg.select_metric}"
        if t.max_epochs > t.epochs:
            line += f", or goes on to {t.max_epochs} epochs while it still improves"
    return line


def epoch_limit(cfg: Config) -> int:
    """The most epochs the run may take: train.max_epochs when an extension is allowed, else train.epochs."""
    return max(cfg.train.epochs, cfg.train.max_epochs)


def stop_reason(cfg: Config, epoch: int, stale: int, best: float | None, best_step: int) -> str | None:
    """Why the run ends after the validation closing `epoch`, or None to go on. `stale`: validations since the
    selection metric last improved; a plateau counts only once the warm-up is over."""
    t = cfg.train
    metric = cfg.select_metric
    if t.patience and stale >= t.patience and epoch >= t.warmup_fraction * t.epochs:
        return f"plateau: no better val {metric} in {stale} validations (best {best:.4f} at step {best_step})"
    if epoch >= epoch_limit(cfg):
        return "budget: max_epochs reached" if t.max_epochs > t.epochs else "budget: train.epochs done"
    return None
