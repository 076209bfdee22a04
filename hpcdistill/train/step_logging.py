"""What a run logs at each log step (log.log_every optimizer steps, and at each epoch's end): the mean losses since
the last log, the learning rate, throughput, each step's time split into waiting for data and computing, the
gradient norm, peak memory (the process's RSS, and the GPU's where there is one); and a few input images. Every
scalar goes to TensorBoard and metrics.jsonl alike (metrics_log.MetricsLog)."""

from __future__ import annotations

import resource
from typing import Any

import torch

from hpcdistill.common.mags import mag_name
from hpcdistill.train.state import Trainer

TIMERS = ("_n", "_data_s", "_compute_s", "_grad_norm")  # what the meter holds besides the losses


def logs_next_step(trainer: Trainer) -> bool:
    """Whether the step about to be taken is a log step (log.log_every): its gradient norm is measured then."""
    return (trainer.state.global_step + 1) % trainer.cfg.log.log_every == 0


def grad_norm(module: torch.nn.Module) -> float:
    """The L2 norm of every gradient together, as clipping would see it (after DeepSpeed's all-reduce)."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def time_step(meter: dict[str, float], data_s: float, compute_s: float) -> None:
    """Add one step's wait for its batches (reading, decoding, copying to the device) and its forward, backward
    and optimizer step to the meter. train_step reads the losses back, so its time includes the device's work."""
    meter["_data_s"] = meter.get("_data_s", 0.0) + data_s
    meter["_compute_s"] = meter.get("_compute_s", 0.0) + compute_s


def logscalars(trainer: Trainer, images_per_s: float) -> None:
    state, step, write = trainer.state, trainer.state.global_step, trainer.writer.add_scalar
    timers = {k: state.meter.pop(k) for k in TIMERS if k in state.meter}
    n = timers.get("_n", 1.0)
    for k, v in state.meter.items():
        write(f"loss/{k}", v / n, step)
    state.meter.clear()
    write("lr", trainer.engine.get_lr()[0], step)
    write("throughput/images_per_s", images_per_s, step)
    if "_grad_norm" in timers:
        write("train/grad_norm", timers["_grad_norm"], step)
    if "_data_s" in timers:
        data_s, compute_s = timers["_data_s"] / n, timers["_compute_s"] / n
        write("time/data_wait_s", data_s, step)  # per optimizer step, mean since the last log
        write("time/compute_s", compute_s, step)
        write("time/data_wait_share", data_s / max(data_s + compute_s, 1e-12), step)
    # ru_maxrss is KiB on Linux: the peak of the process so far, whole tissues vary and the peak is what fails
    write("memory/cpu_peak_rss_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, step)
    if trainer.device.type == "cuda":  # peak since the last log
        write("memory/peak_allocated_gib", torch.cuda.max_memory_allocated(trainer.device) / 2**30, step)
        torch.cuda.reset_peak_memory_stats(trainer.device)


def log_images(trainer: Trainer, batch: dict[str, Any]) -> None:
    """A few inputs, un-standardised: the teacher's at 10x (teacher mode, and beside the student's in distill), the
    student's at its magnification. Non-finite images (bad manifest stats) are not logged: they draw nothing."""
    if trainer.rank != 0:
        return
    n = trainer.cfg.log.num_images
    role = "teacher" if trainer.cfg.train.mode == "teacher" else "student"
    slots = [("x", role, trainer.cfg.model_mag)] + (
        [("t", "teacher", trainer.cfg.data.teacher_mag)] if "t" in batch else []
    )
    for slot, who, mag in slots:
        s = trainer.plan.stats[mag_name(mag)]
        mean, std = torch.tensor(s["mean"]).view(1, 3, 1, 1), torch.tensor(s["std"]).view(1, 3, 1, 1)
        images = batch[slot][:n].float().cpu() * std + mean
        if torch.isfinite(images).all():
            trainer.writer.add_images(f"inputs/{who}_{mag_name(mag)}", images.clamp(0, 1), trainer.state.global_step)
