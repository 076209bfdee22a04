"""The training loop for the four phases: teacher (10x, CE), baseline (low mag, CE), distill (frozen teacher at 10x
-> student at low mag, soft + pixel loss, labels unused) and finetune (FC only, CE on labeled low-mag data).

Layers, each short: forward_loss -> forward_backward_step (one micro-batch) -> train_step (one optimizer step,
`grad_accum` micro-batches) -> train_epoch -> fit. `run(cfg)` is the single entry point (CLI and SLURM launcher);
it reads rank and world size from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
Building the run is build.py, its data data_plan.py, validation validation.py, checkpoints checkpointing.py.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hpcdistill.common.console import say
from hpcdistill.common.errors import TrainError
from hpcdistill.common.folder_lock import one_writer
from hpcdistill.common.mags import mag_name
from hpcdistill.common.progress import describe
from hpcdistill.common.ranks import is_rank_zero
from hpcdistill.common.signals import Interrupted, check_interrupted, deferred
from hpcdistill.config.loading import load_config
from hpcdistill.config.schema import Config
from hpcdistill.data.device_batch import finish_batch
from hpcdistill.data.streams import make_loader
from hpcdistill.scoring.cohort_checks import collapse_line
from hpcdistill.scoring.method_labels import method_label
from hpcdistill.scoring.metrics import METRIC_TITLES
from hpcdistill.train.budget import epoch_limit, stop_reason
from hpcdistill.train.build import build_trainer
from hpcdistill.train.checkpointing import export_selection, export_weights, save_checkpoint
from hpcdistill.train.class_logging import log_classes
from hpcdistill.train.data_plan import stream_spec
from hpcdistill.train.distributed import barrier
from hpcdistill.train.nonfinite_stop import check_finite
from hpcdistill.train.state import Trainer, model_input, scalars
from hpcdistill.train.step_logging import grad_norm, log_images, logs_next_step, logscalars, time_step
from hpcdistill.train.validation import validate


def forward_loss(trainer: Trainer, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    x = model_input(trainer, batch["x"])
    if trainer.teacher is not None:
        from hpcdistill.train.losses import distill_loss

        with torch.no_grad():
            t_feat, t_logits = trainer.teacher(model_input(trainer, batch["t"]))
        s_feat, s_logits = trainer.engine(x)
        t = trainer.cfg.train
        return distill_loss(
            s_feat.float(), s_logits.float(), t_feat.float(), t_logits.float(), t.temperature, tuple(t.pixel_resize)
        )
    _, logits = trainer.engine(x)
    return {"total": F.cross_entropy(logits.float(), batch["y"].to(trainer.device))}


def forward_backward_step(trainer: Trainer, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One micro-batch; DeepSpeed scales by 1/grad_accum and steps the optimizer at the accumulation boundary.
    Returns the losses as device tensors: reading them here would make the host wait for the device every
    micro-batch."""
    state = trainer.state
    try:
        losses = forward_loss(trainer, batch)
        trainer.engine.backward(losses["total"])
    except torch.cuda.OutOfMemoryError:  # whole tissues vary in size: name the one that did not fit
        sizes = [
            f"{x.shape[-1]}x{x.shape[-2]} px at {mag_name(mag)}"
            for name, mag in (("x", trainer.cfg.model_mag), ("t", trainer.cfg.data.teacher_mag))
            if (x := batch.get(name)) is not None
        ]
        raise TrainError(
            f"step {state.global_step + 1} (epoch {state.epoch}): out of GPU memory on "
            f"{batch['key'][0]} ({', '.join(sizes)}, micro-batch {len(batch['key'])}); reshard with a "
            f"smaller --max-size (tissues are cut into aligned windows) or lower train.micro_batch. "
            f"Last checkpoint: {state.last_ckpt or 'none'}"
        ) from None
    if trainer.engine.is_gradient_accumulation_boundary() and logs_next_step(trainer):
        state.meter["_grad_norm"] = grad_norm(trainer.engine.module)  # before the step consumes the gradients
    trainer.engine.step()
    return {k: v.detach().float() for k, v in losses.items()}


def train_step(trainer: Trainer, batches: list[dict[str, Any]]) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches; returns the mean losses (one host-device sync per step)."""
    check_interrupted()
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        for k, v in forward_backward_step(trainer, batch).items():
            sums[k] = sums[k] + v if k in sums else v
    means = {k: v / len(batches) for k, v in sums.items()}
    check_finite(trainer, means["total"], batches)
    if trainer.ema is not None:  # after the finiteness check: a diverged step never enters the average
        trainer.ema.update(trainer.engine.module)
    values = torch.stack(list(means.values())).tolist()
    trainer.state.global_step += 1
    trainer.state.batch += len(batches)
    return dict(zip(means, values))


def train_epoch(trainer: Trainer) -> bool:
    """Train until the epoch ends (False) or max_steps is reached mid-epoch (True)."""
    state = trainer.state
    from tqdm import tqdm

    cfg = trainer.cfg
    spec = stream_spec(
        cfg, trainer.plan, trainer.rank, trainer.world, epoch=state.epoch, start_batch=state.batch, val=False
    )
    loader = iter(make_loader(spec, cfg.data.num_workers, pin_memory=trainer.device.type == "cuda"))
    accum = cfg.train.grad_accum
    drawn = trainer.rank == 0 and cfg.log.progress and sys.stderr.isatty()  # bars only on a terminal
    shape = dict(total=trainer.plan.steps_per_epoch, initial=state.batch // accum, desc=f"epoch {state.epoch}")
    bar = tqdm(**shape, disable=not drawn, leave=False, dynamic_ncols=True)
    trainer.engine.module.train()
    first = True
    tick, images = time.perf_counter(), 0
    while state.batch < trainer.micro_per_epoch:
        if cfg.train.max_steps and state.global_step >= cfg.train.max_steps:
            bar.close()
            return True
        waited = time.perf_counter()
        batches = [finish_batch(next(loader), trainer.device, trainer.dtype) for _ in range(accum)]
        if first or (cfg.log.images_every and state.global_step % cfg.log.images_every == 0):
            log_images(trainer, batches[0])
            first = False
        computed = time.perf_counter()
        losses = train_step(trainer, batches)
        time_step(state.meter, computed - waited, time.perf_counter() - computed)
        images += sum(len(b["key"]) for b in batches) * trainer.world
        for meter in (state.meter, state.epoch_meter):  # since the last scalar log, and since the epoch began
            for k, v in [*losses.items(), ("_n", 1.0)]:
                meter[k] = meter.get(k, 0.0) + v
        ends = state.batch >= trainer.micro_per_epoch or state.global_step == cfg.train.max_steps
        if state.global_step % cfg.log.log_every == 0 or ends:  # the loss at least once per epoch, whatever log_every
            logscalars(trainer, images / (time.perf_counter() - tick))
            report_progress(trainer, "train")
            tick, images = time.perf_counter(), 0
        bar.update(1)
        bar.set_postfix(loss=f"{losses['total']:.4f}")
        every = cfg.train.checkpoint_every_steps
        due = bool(every and state.global_step % every == 0) | checkpoint_time_due(trainer)  # `|`: both are collective
        if due and state.batch < trainer.micro_per_epoch:
            save_checkpoint(trainer)
    bar.close()
    return False


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    full = steps_per_epoch * epoch_limit(cfg)
    return min(full, cfg.train.max_steps) if cfg.train.max_steps else full


def report_progress(trainer: Trainer, phase: str) -> None:
    """progress.json in the run folder: epoch, step and an ETA from this process's own pace (validation included)."""
    state = trainer.state
    total = total_steps(trainer.cfg, trainer.plan.steps_per_epoch)
    since, first_step = state.started
    done = state.global_step - first_step
    elapsed = time.monotonic() - since
    eta = (total - state.global_step) * elapsed / done if done > 0 and phase != "done" else None
    progress = {
        "mode": trainer.cfg.train.mode,
        "phase": phase,
        "epoch": state.epoch,
        "epochs": epoch_limit(trainer.cfg),
        "step": state.global_step,
        "steps": total,
        "eta_s": eta,
        "updated": time.time(),
    }
    trainer.folder.write_progress(progress)
    log = trainer.cfg.log
    quiet_output = trainer.rank != 0 or not log.progress or sys.stderr.isatty()  # a terminal has the bar
    if not quiet_output and phase == "train" and time.monotonic() - state.last_progress_line >= log.progress_every_s:
        state.last_progress_line = time.monotonic()
        say(f"{trainer.cfg.run.name}: {describe(progress)}")


def checkpoint_time_due(trainer: Trainer) -> bool:
    """train.checkpoint_every_min: rank 0's clock decides and every rank follows (saving a checkpoint is collective,
    and ranks' clocks differ); one tiny broadcast per optimizer step, only when the option is on."""
    minutes = trainer.cfg.train.checkpoint_every_min
    if not minutes:
        return False
    due = time.monotonic() - trainer.state.last_save_time >= minutes * 60
    if trainer.world == 1:
        return due
    flag = torch.tensor([float(due)], device=trainer.device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def end_epoch(trainer: Trainer) -> None:
    """Validate, keep the best export, advance, checkpoint (after validation: a resume never repeats it)."""
    state = trainer.state
    report_progress(trainer, "validate")
    metrics = validate(trainer)
    state.last_val = metrics
    for k, v in scalars(metrics).items():
        trainer.writer.add_scalar(f"val/{k}", v, state.global_step)
    log_classes(trainer, metrics)
    improved = []
    for sel in state.selections:
        if metrics and sel.metric not in metrics:
            key = "train.select_metric" if sel.file == "best.pt" else "train.export_also"
            raise TrainError(f"{key}: {sel.metric!r} is not a val metric (have {', '.join(scalars(metrics))})")
        improved.append(not metrics or sel.improves(metrics))
        if improved[-1]:
            sel.take(metrics, state.global_step)
            export_selection(trainer, sel)
    state.stale = 0 if improved[0] else state.stale + 1
    state.epoch += 1
    state.batch = 0
    say_validation(trainer, metrics, improved[0])
    best = state.selections[0]
    state.stop_reason = stop_reason(trainer.cfg, state.epoch, state.stale, best.value, best.step) or ""
    save_checkpoint(trainer)


def say_validation(trainer: Trainer, metrics: dict[str, Any], new_best: bool) -> None:
    """One line per validation: where the run is, its training loss since the last line, the selection metric by
    its name with the pick, balanced and top-1 accuracy; and a line when the model calls nearly everything one class."""
    state = trainer.state
    if trainer.rank != 0 or not metrics:
        return
    metric = trainer.cfg.select_metric
    n = state.epoch_meter.pop("_n", 0.0)
    loss = f"train loss {state.epoch_meter.get('total', 0.0) / n:.4f}, " if n else ""
    state.epoch_meter.clear()
    mark = "new best" if new_best else f"best {state.selections[0].value:.4f}, {state.stale} without better"
    readable = [f"{METRIC_TITLES[k].lower()} {metrics[k]:.4f}" for k in ("balanced_accuracy", "top1") if k in metrics]
    say(
        f"epoch {state.epoch}/{epoch_limit(trainer.cfg)} step {state.global_step}: {loss}val {metric_title(metric)} "
        f"{metrics[metric]:.4f} (the selection metric; {mark})" + "".join(f", {r}" for r in readable)
    )
    if "confusion" in metrics:
        confusion = np.asarray(metrics["confusion"])
        labels, calls = np.nonzero(confusion)
        counts = confusion[labels, calls]
        line = collapse_line(np.repeat(calls, counts), trainer.plan.classes, "tissue", np.repeat(labels, counts))
        if line:
            say(f"validation after step {state.global_step}: {line}")


def metric_title(metric: str) -> str:
    """'ema_accuracy' -> 'EMA OvR accuracy (paper)', 'loss' -> 'loss': the name a person reads."""
    ema, base = metric.startswith("ema_"), metric.removeprefix("ema_")
    return ("EMA " if ema else "") + (METRIC_TITLES[base] if base in METRIC_TITLES else base)


def run(cfg: Config) -> dict[str, Any]:
    """Train as the config says, resuming if asked; returns a summary (best metric, paths, steps). Rank 0 holds the run
    folder for the run's lifetime: a second run into it is refused (the ranks of one run are one writer)."""
    with one_writer(cfg.run_dir) if is_rank_zero() else contextlib.nullcontext(), deferred():
        return fit(build_trainer(cfg))


def fit(trainer: Trainer) -> dict[str, Any]:
    """The epoch loop over a built trainer (separate from `run` so tests can inspect each rank's engine after)."""
    state = trainer.state
    cfg = trainer.cfg
    stopped = False
    # A rerun of a finished run (a requeue or relaunch after the last step) only reports: its exports and hparams exist.
    done_before = bool(state.stop_reason) and (cfg.run_dir / "last.pt").is_file()
    state.started = (time.monotonic(), state.global_step)
    report_progress(trainer, "train")
    try:
        while not state.stop_reason and not stopped:
            stopped = train_epoch(trainer)
            if stopped:
                save_checkpoint(trainer)
            else:
                end_epoch(trainer)
                stopped = bool(cfg.train.max_steps and state.global_step >= cfg.train.max_steps)
        if state.stop_reason and not done_before and trainer.rank == 0:
            say(f"{cfg.run.name}: stopped at epoch {state.epoch}, step {state.global_step} ({state.stop_reason})")
        if not done_before:
            export_weights(trainer, "last.pt")
            if trainer.ema is not None:
                export_weights(trainer, "last-ema.pt", ema=True)
        report_progress(trainer, "stopped" if stopped else "done")
        barrier()
        if not stopped and not done_before:
            _write_hparams(trainer)
    except Interrupted:  # status must not show a dead run as validating or training
        report_progress(trainer, "interrupted")
        raise
    finally:
        trainer.writer.close()
    return {
        "run_dir": str(cfg.run_dir),
        "mode": cfg.train.mode,
        "epoch": state.epoch,
        "global_step": state.global_step,
        "stopped_early": stopped,
        "stop_reason": state.stop_reason or ("train.max_steps reached" if stopped else ""),
        "select_metric": cfg.select_metric,
        "best": state.selections[0].value,
        "best_step": state.selections[0].step,
        "best_path": str(cfg.run_dir / "best.pt"),
        "last_path": str(cfg.run_dir / "last.pt"),
        "last_checkpoint": state.last_ckpt,
        "val": scalars(state.last_val),
    }


def _write_hparams(trainer: Trainer) -> None:
    """TensorBoard's HParams row of a finished run: what tells runs apart (method, aux sets, seed, EMA) beside the
    validation of the exported pick (best.pt), not of the last epoch."""
    cfg = trainer.cfg
    hparams = {
        "method": method_label(cfg.to_dict()),
        "mode": cfg.train.mode,
        "arch": cfg.model.arch,
        "mag": cfg.model_mag,
        "lr": cfg.train.lr,
        "grad_accum": cfg.train.grad_accum,
        "temperature": cfg.train.temperature,
        "pixel_resize": "+".join(cfg.train.pixel_resize) or "none",
        "stem": cfg.model.stem,
        "aux": "+".join(cfg.data.aux) or "none",
        "seed": cfg.run.seed,
        "ema_decay": cfg.train.ema_decay,
    }
    picked = trainer.state.selections[0].at_pick or scalars(trainer.state.last_val)
    trainer.writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in picked.items()}, run_name=".")


train = run  # `engine.train(cfg)` reads naturally at call sites; the same entry point


def main_train(argv: list[str]) -> int:
    """`hpcdistill train CONFIG [key=value ...]`."""
    if not argv:
        raise TrainError("train: usage: hpcdistill train CONFIG.yaml [key=value ...]")
    summary = run(load_config(argv[0], argv[1:]))
    if summary and is_rank_zero():
        print(json.dumps(summary, indent=2), file=sys.stdout)
    return 0
