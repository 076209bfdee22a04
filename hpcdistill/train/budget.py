"""A run's budget and when it ends: how many optimizer steps it has and how that number was derived, the learning-rate
schedule over those steps (DeepSpeed's WarmupCosineLR, stepped by the engine at every optimizer step and saved in its
checkpoints, so a resume continues it exactly), and the stop rule: the budget, a validation plateau
(`train.patience`) or an extension to `train.max_epochs` while validation still improves."""

from __future__ import annotations

from typing import Any

from hpcdistill.common.config import Config
from hpcdistill.common.errors import TrainError

# Settings that shape the schedule: changing one on resume would bend the curve the run is on (refused).
SCHEDULE_KEYS = ("train.epochs", "train.lr")


def epoch_samples(cfg: Config, labelled: int, selected: int) -> tuple[int, str]:
    """Samples per epoch over all ranks, and how that count was derived (for the budget line)."""
    d = cfg.data
    if d.epoch_passes:
        count = max(1, round(d.epoch_passes * labelled))
        return count, f"{d.epoch_passes:g} pass(es) over the {labelled} labelled train tissues of data.train"
    if d.epoch_samples:
        return d.epoch_samples, f"data.epoch_samples={d.epoch_samples}"
    return selected, f"one pass over the {selected} samples of the selected sets"


def scheduler_config(cfg: Config, steps_per_epoch: int) -> dict[str, Any] | None:
    """DeepSpeed's `scheduler` entry for train.schedule, or None for the constant lr. The linear warm-up starts at 0
    (the first step only fills Adam's moments, as most warm-ups do); the decay ends at lr x min_lr_ratio after
    train.epochs and stays there through an extension."""
    t = cfg.train
    if t.schedule == "constant":
        return None
    total = t.epochs * steps_per_epoch
    warmup = round(t.warmup_epochs * steps_per_epoch)
    if warmup >= total:
        raise TrainError(f"train.warmup_epochs: {warmup} warm-up steps leave none of the {total} steps to decay over")
    return {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": total,
            "warmup_num_steps": max(1, warmup),
            "warmup_type": "linear",
            "warmup_min_ratio": 0.0 if warmup else 1.0,  # no warm-up: the two steps DeepSpeed keeps are at full lr
            "cos_min_ratio": t.min_lr_ratio,
        },
    }


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
        f"{t.grad_accum} x {steps_per_epoch} steps, on {world} rank(s))"
    )
    if t.schedule == "cosine":
        warmup = round(t.warmup_epochs * steps_per_epoch)
        line += f"; lr {t.lr:g}, {warmup} warm-up steps, cosine to {t.lr * t.min_lr_ratio:g}"
    else:
        line += f"; constant lr {t.lr:g}"
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
    selection metric last improved."""
    t = cfg.train
    metric = cfg.select_metric
    if t.patience and stale >= t.patience and epoch >= t.warmup_epochs:
        return f"plateau: no better val {metric} in {stale} validations (best {best:.4f} at step {best_step})"
    if epoch >= epoch_limit(cfg):
        return "budget: max_epochs reached" if t.max_epochs > t.epochs else "budget: train.epochs done"
    return None
