"""DeepSpeed training for the four phases: teacher (10x, CE), baseline (low mag, CE), distill (frozen teacher at 10x
-> student at low mag, soft + pixel loss, labels unused) and finetune (FC only, CE on labeled low-mag data).

Layers, each short: forward_loss -> forward_backward_step (one micro-batch) -> train_step (one optimizer step,
`grad_accum` micro-batches) -> train_epoch -> run. `run(cfg)` is the single entry point (CLI and SLURM launcher);
it reads rank and world size from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

DeepSpeed runs at ZeRO stage 0 (plain data parallel). Its json gives precision and the optimizer; this module fills
in micro-batch, accumulation, lr and weight decay from the config so the two never disagree.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hpcdistill.config import Config, load_config, resolve_path
from hpcdistill.data import (ShardSet, StreamSpec, finish_batch, make_loader, mag_stats, per_rank_samples,
                             manifest_digest, read_manifest, resolve_sets, split_summary)
from hpcdistill.distributed import any_rank, barrier, device_for, setup_distributed
from hpcdistill.errors import HpcdistillError
from hpcdistill.mags import mag_name
from hpcdistill.run_folder import (RunFolder, apply_resumable, check_resume_config, load_exported, say,
                                   use_weights_only_loads)


class TrainError(HpcdistillError):
    """Training cannot start or must stop (bad setup, non-finite loss)."""


# ---------------------------------------------------------------------------------------------- builders


def build_ds_config(cfg: Config, world: int, on_cpu: bool) -> dict[str, Any]:
    path = resolve_path(cfg.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except OSError:
        raise TrainError(f"deepspeed: {path}: not found") from None
    except json.JSONDecodeError as err:
        raise TrainError(f"deepspeed: {path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch * t.grad_accum * world
    ds.setdefault("gradient_clipping", 0.0)  # DeepSpeed would clip at 1.0 otherwise
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != 0:
        raise TrainError(f"deepspeed: {path}: zero_optimization.stage must be 0 (plain data parallel), got {stage}")
    opt = ds.setdefault("optimizer", {"type": "Adam", "params": {}})
    opt.setdefault("params", {})
    opt["params"].update(lr=t.lr, weight_decay=t.weight_decay)
    opt["params"].setdefault("torch_adam", True)  # no fused C++ op to compile
    if cfg.precision != "auto":
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.precision == "bf16"}
        ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.precision == "fp16"}
    if ds.get("fp16", {}).get("enabled") and on_cpu:
        raise TrainError(f"precision: fp16 is not supported on CPU (from {path.name}); use bf16 or fp32")
    return ds


def model_mag(cfg: Config) -> float:
    """The magnification the trained network sees."""
    return cfg.data.teacher_mag if cfg.train.mode == "teacher" else cfg.data.mag


def build_student(cfg: Config, classes: list[str]) -> torch.nn.Module:
    from hpcdistill.models import build_model

    m = cfg.model
    if m.num_classes != len(classes):
        raise TrainError(f"model.num_classes: {m.num_classes}, but the manifest has {len(classes)} classes {classes}")
    torch.manual_seed(cfg.run.seed)
    model = build_model(m.arch, m.num_classes, width=m.width, groups=m.groups, stem=m.stem)
    if m.init:
        init = load_exported(resolve_path(m.init), expect_classes=m.num_classes)
        if init.arch_kwargs != model.arch_kwargs:
            raise TrainError(f"model.init: {m.init} is {init.arch_kwargs}, but the config builds {model.arch_kwargs}")
        if not math.isclose(init.mag, model_mag(cfg)):
            raise TrainError(f"model.init: {m.init} was trained at {mag_name(init.mag)}, this run is at {mag_name(model_mag(cfg))}")
        model.load_state_dict(init.model.state_dict())
    if cfg.train.mode == "finetune":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("fc."))  # the paper freezes everything but the fully connected layer
    return model


def build_teacher(cfg: Config) -> torch.nn.Module:
    teacher = load_exported(resolve_path(cfg.teacher.checkpoint), expect_classes=cfg.model.num_classes)
    if not math.isclose(teacher.mag, cfg.data.teacher_mag):
        raise TrainError(f"teacher.checkpoint: trained at {mag_name(teacher.mag)}, data.teacher_mag is "
                         f"{mag_name(cfg.data.teacher_mag)}")
    model = teacher.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class DataPlan:
    manifest: dict[str, Any]
    train: ShardSet
    val: ShardSet | None
    classes: list[str]
    stats: dict[str, dict[str, list[float]]]
    per_rank: int  # samples per rank per epoch
    steps_per_epoch: int  # optimizer steps
    manifest_sha256: str | None = None


def plan_data(cfg: Config, world: int) -> DataPlan:
    d, t = cfg.data, cfg.train
    shards = resolve_path(d.shards)
    manifest = read_manifest(shards)

    def nonempty(key: str, entries: list[str]) -> list[ShardSet]:
        """Each entry resolved once; an empty one would silently turn KD (ADv1) into plain KD, or skip validation."""
        sets = [resolve_sets(shards, manifest, [entry]) for entry in entries]
        for entry, found in zip(entries, sets):
            if found.samples == 0:
                raise TrainError(f"{key}: the set {entry!r} in {shards} holds no samples "
                                 f"(splits: {split_summary(manifest)})")
        return sets

    train = ShardSet.combine(nonempty("data.train", d.train) + (nonempty("data.aux", d.aux) if t.mode == "distill" else []))
    val = ShardSet.combine(nonempty("data.val", d.val)) if d.val else None
    mags = {mag_name(model_mag(cfg))}
    if t.mode == "distill":
        mags.add(mag_name(d.teacher_mag))
    stats = {name: mag_stats(manifest, float(name[:-1])) for name in mags}
    unit = t.micro_batch * t.grad_accum
    per_rank = per_rank_samples(d.epoch_samples or train.samples, world, unit)
    return DataPlan(manifest, train, val, list(manifest.get("classes", [])), stats, per_rank, per_rank // unit,
                    manifest_digest(shards))


def stream_spec(cfg: Config, plan: DataPlan, rank: int, world: int, *, epoch: int, start_batch: int,
                val: bool) -> StreamSpec:
    d, t = cfg.data, cfg.train
    mode = "paired" if t.mode == "distill" else "labeled"
    return StreamSpec(
        urls=(plan.val if val else plan.train).urls, mode=mode, mag=model_mag(cfg), teacher_mag=d.teacher_mag,
        stats=plan.stats, micro_batch=1 if val else t.micro_batch, samples=-1 if val else plan.per_rank,
        rank=rank, world=world, seed=cfg.run.seed, epoch=epoch, sampler="ordered" if val else d.sampler,
        augment=None if val else d.augment, shuffle_buffer=d.shuffle_buffer, bucketed=t.bucketed and not val,
        bucket_window=t.bucket_window, start_batch=start_batch, defer_colour=True,  # colour maps run on the device
    )


class NullWriter:
    """TensorBoard stand-in for ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def build_writer(cfg: Config, rank: int) -> Any:
    if rank != 0 or not cfg.log.tensorboard:
        return NullWriter()
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(cfg.run_dir / "tb"))
    text = "    " + json.dumps(cfg.to_dict(), indent=2).replace("\n", "\n    ")  # indented = markdown code block
    writer.add_text("config", text, 0)
    return writer


# ---------------------------------------------------------------------------------------------- state


@dataclass
class State:
    cfg: Config
    rank: int
    world: int
    device: torch.device
    engine: Any
    teacher: torch.nn.Module | None
    plan: DataPlan
    writer: Any
    dtype: torch.dtype
    folder: RunFolder
    epoch: int = 0
    batch: int = 0  # micro-batches consumed in the current epoch
    global_step: int = 0  # optimizer steps
    best: float | None = None
    best_step: int = -1
    best_loss: float = math.inf  # val loss of the best export: breaks ties of the selection metric
    last_ckpt: str = ""
    last_save_time: float = field(default_factory=time.monotonic)  # for train.checkpoint_every_min
    started: tuple[float, int] = (0.0, 0)  # (monotonic time, global step) when this process began training: the ETA
    teacher_val: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    teacher_val_bytes: int = 0
    last_val: dict[str, Any] = field(default_factory=dict)
    meter: dict[str, float] = field(default_factory=dict)

    @property
    def micro_per_epoch(self) -> int:
        return self.plan.steps_per_epoch * self.cfg.train.grad_accum


def skip_single_rank_allreduce(engine: Any, world: int) -> None:
    """With one rank there is nothing to reduce, but DeepSpeed still flattens, all-reduces and copies back every
    gradient after each backward (~4% of a ResNet-18 step on CPU): switch that path off."""
    if world == 1:
        engine.enable_backward_allreduce = False


def build_state(cfg: Config) -> State:
    """Everything a run needs, resumed from its run folder as `run.resume` says. The config stored in the
    checkpoint is compared first, so a refused change stops before any model is built."""
    rank, world, local = setup_distributed()  # first: it settles DeepSpeed's accelerator before deepspeed is imported
    import deepspeed

    folder = RunFolder(cfg.run_dir, rank)
    target = folder.resume_target(cfg.run.resume)
    changes: list[str] = []
    stored, manifest_sha256 = folder.stored_config(target) if target is not None else (None, None)
    if target is not None and stored is not None:
        same_shards = manifest_sha256 is not None and manifest_sha256 == manifest_digest(resolve_path(cfg.data.shards))
        changes = check_resume_config(stored, cfg.to_dict(), target, cfg.run.name, same_shards)
    device = device_for(local)
    ds_config = build_ds_config(cfg, world, on_cpu=device.type == "cpu")
    plan = plan_data(cfg, world)
    model = build_student(cfg, plan.classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    skip_single_rank_allreduce(engine, world)
    use_weights_only_loads(engine)
    dtype = next(engine.module.parameters()).dtype
    teacher = build_teacher(cfg).to(device, dtype=dtype) if cfg.train.mode == "distill" else None
    state = State(cfg, rank, world, device, engine, teacher, plan, NullWriter(), dtype, folder)
    if target is not None:
        resume(state, target, changes)
    state.writer = build_writer(cfg, rank)
    folder.write_config(cfg.to_dict())  # only now: a refused resume leaves the run's config.yaml as it was
    return state


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: State) -> str:
    client = {
        "epoch": state.epoch, "batch": state.batch, "global_step": state.global_step,
        "best": state.best, "best_step": state.best_step, "best_loss": state.best_loss, "last_val": _scalars(state.last_val),
        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        "manifest_sha256": state.plan.manifest_sha256,  # the data's identity, whatever path it is read from
    }
    path = state.folder.save_checkpoint(state.engine, state.global_step, client, state.cfg.to_dict(),
                                        state.cfg.train.keep_last)
    state.last_ckpt = str(path)
    state.last_save_time = time.monotonic()
    state.writer.flush()  # TensorBoard is on disk up to the checkpoint: a hard kill (preemption) loses only the rerun part
    return state.last_ckpt


def resume(state: State, target: Path, changes: list[str]) -> None:
    """Restore weights, optimizer, position in the data and RNG from `target`; then apply the config's resumable
    settings (lr, weight decay) over the optimizer state's, and say where the run goes on from."""
    client = state.folder.load_checkpoint(state.engine, target)
    apply_resumable(state.engine, state.cfg.train)
    newer = [p for p in state.folder.complete_checkpoints() if p.name > target.name]
    if newer:  # run.resume named an older checkpoint: a later requeue must not jump back to the abandoned future
        state.folder.set_aside(newer, f"superseded: the run was resumed from {target}", ".superseded")
    state.epoch, state.batch, state.global_step = client["epoch"], client["batch"], client["global_step"]
    state.best, state.best_step, state.last_val = client["best"], client["best_step"], client.get("last_val", {})
    state.best_loss = client.get("best_loss", math.inf)
    torch.set_rng_state(client["torch_rng"])
    random.setstate(client["python_rng"])
    state.last_ckpt = str(target)
    note = f"; changed on resume: {', '.join(changes)}" if changes else ""
    best_step = state.folder.export_step("best.pt")
    if state.best is not None and best_step is not None and best_step != state.best_step:
        # best.pt comes from a trajectory this resume discards (a diverged or explicitly skipped stretch)
        state.best, state.best_step, state.best_loss = None, -1, math.inf
        note += f"; best.pt (step {best_step}) is not from this trajectory and will be re-selected"
    say(f"resuming from {target} (step {state.global_step}, epoch {state.epoch}, micro-batch {state.batch} of the "
        f"epoch){note}")


def export_weights(state: State, name: str) -> None:
    mag = model_mag(state.cfg)
    state.folder.export_weights(name, state.engine.module, mag=mag, classes=state.plan.classes,
                                stats=state.plan.stats[mag_name(mag)], config=state.cfg.to_dict(),
                                global_step=state.global_step)


def stop_on_divergence(state: State, inputs: list[dict[str, Any]], what: str) -> None:
    """A non-finite loss or output: stop, naming a checkpoint that really is good. Inputs that are themselves
    non-finite are a data problem (no checkpoint is blamed). Otherwise the complete checkpoints are tried newest
    first on the same inputs; those whose outputs are not finite either are set aside (`<tag>.diverged`), so a
    rerun with a corrected setting resumes from the good one with no manual step. Collective: every rank stops."""
    bad_input = next((b["key"][0] for b in inputs if not all(torch.isfinite(b[s]).all() for s in ("x", "t") if s in b)),
                     None)
    if any_rank(bad_input is not None, state.device):
        raise TrainError(f"{what}: non-finite input image{f' in sample {bad_input}' if bad_input else ' on another rank'}"
                         " (check the manifest's mean/std and the shards); stopped, no checkpoint was set aside")
    module, good, diverged = state.engine.module, None, []
    for candidate in reversed(state.folder.complete_checkpoints()):
        state.folder.load_module_weights(module, candidate)
        if not any_rank(not outputs_finite(state, inputs), state.device):
            good = candidate
            break
        diverged.append(candidate)
    moved = state.folder.set_aside(diverged, f"{what}; outputs of these weights are not finite on the same inputs")
    aside = f"; set aside as diverged: {', '.join(p.name for p in moved)}" if moved else ""
    start = f"resumes from {good}" if good else "starts from the beginning"
    raise TrainError(f"{what}; stopped. Last good checkpoint: {good or 'none'}{aside}. A rerun (e.g. with a lower "
                     f"train.lr) {start}")


@torch.no_grad()
def outputs_finite(state: State, inputs: list[dict[str, Any]]) -> bool:
    module = state.engine.module
    for batch in inputs:
        features, logits = module(batch["x"].to(state.device, state.dtype))
        if not (torch.isfinite(features).all() and torch.isfinite(logits).all()):
            return False
    return True


# ---------------------------------------------------------------------------------------------- the loop


def forward_loss(state: State, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    x = batch["x"].to(state.device, state.dtype)
    if state.teacher is not None:
        from hpcdistill.losses import distill_loss

        with torch.no_grad():
            t_feat, t_logits = state.teacher(batch["t"].to(state.device, state.dtype))
        s_feat, s_logits = state.engine(x)
        t = state.cfg.train
        return distill_loss(s_feat.float(), s_logits.float(), t_feat.float(), t_logits.float(),
                            t.temperature, tuple(t.pixel_resize))
    _, logits = state.engine(x)
    return {"total": F.cross_entropy(logits.float(), batch["y"].to(state.device))}


def forward_backward_step(state: State, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One micro-batch; DeepSpeed scales by 1/grad_accum and steps the optimizer at the accumulation boundary.
    Returns the losses as device tensors: reading them here would make the host wait for the device every micro-batch."""
    try:
        losses = forward_loss(state, batch)
        state.engine.backward(losses["total"])
    except torch.cuda.OutOfMemoryError:  # whole tissues vary in size: name the one that did not fit
        sizes = [f"{x.shape[-1]}x{x.shape[-2]} px at {mag_name(mag)}" for name, mag in
                 (("x", model_mag(state.cfg)), ("t", state.cfg.data.teacher_mag)) if (x := batch.get(name)) is not None]
        raise TrainError(f"step {state.global_step + 1} (epoch {state.epoch}): out of GPU memory on "
                         f"{batch['key'][0]} ({', '.join(sizes)}, micro-batch {len(batch['key'])}); reshard with a "
                         f"smaller --max-size (tissues are cut into aligned windows) or lower train.micro_batch. "
                         f"Last checkpoint: {state.last_ckpt or 'none'}") from None
    state.engine.step()
    return {k: v.detach().float() for k, v in losses.items()}


def check_finite(state: State, loss: torch.Tensor, batches: list[dict[str, Any]]) -> None:
    """Stop every rank together (a rank leaving alone would hang the others in the next collective). Checked once
    per optimizer step: a non-finite step has already updated the weights in memory, but nothing is saved after it."""
    bad = (~torch.isfinite(loss)).float().reshape(1)  # on the device: NCCL reduces no CPU tensors
    if state.world > 1:
        torch.distributed.all_reduce(bad)
    if bad.item():
        stop_on_divergence(state, batches, f"step {state.global_step + 1} (epoch {state.epoch}): loss is "
                                           f"{float(loss)} on {int(bad.item())} rank(s)")


def train_step(state: State, batches: list[dict[str, Any]]) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches; returns the mean losses (one host-device sync per step)."""
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        for k, v in forward_backward_step(state, batch).items():
            sums[k] = sums[k] + v if k in sums else v
    means = {k: v / len(batches) for k, v in sums.items()}
    check_finite(state, means["total"], batches)
    values = torch.stack(list(means.values())).tolist()
    state.global_step += 1
    state.batch += len(batches)
    return dict(zip(means, values))


def train_epoch(state: State) -> bool:
    """Train until the epoch ends (False) or max_steps is reached mid-epoch (True)."""
    from tqdm import tqdm

    cfg = state.cfg
    spec = stream_spec(cfg, state.plan, state.rank, state.world, epoch=state.epoch, start_batch=state.batch, val=False)
    loader = iter(make_loader(spec, cfg.data.num_workers, pin_memory=state.device.type == "cuda"))
    accum = cfg.train.grad_accum
    bar = tqdm(total=state.plan.steps_per_epoch, initial=state.batch // accum, desc=f"epoch {state.epoch}",
               disable=state.rank != 0 or not cfg.log.progress, leave=False, dynamic_ncols=True)
    state.engine.module.train()
    first = True
    tick, images = time.perf_counter(), 0
    while state.batch < state.micro_per_epoch:
        if cfg.train.max_steps and state.global_step >= cfg.train.max_steps:
            bar.close()
            return True
        batches = [finish_batch(next(loader), state.device, state.dtype) for _ in range(accum)]
        if first or (cfg.log.images_every and state.global_step % cfg.log.images_every == 0):
            log_images(state, batches[0])
            first = False
        losses = train_step(state, batches)
        images += sum(len(b["key"]) for b in batches) * state.world
        for k, v in losses.items():
            state.meter[k] = state.meter.get(k, 0.0) + v
        state.meter["_n"] = state.meter.get("_n", 0.0) + 1
        if state.global_step % cfg.log.log_every == 0:
            log_scalars(state, images / (time.perf_counter() - tick))
            report_progress(state, "train")
            tick, images = time.perf_counter(), 0
        bar.update(1)
        bar.set_postfix(loss=f"{losses['total']:.4f}")
        every = cfg.train.checkpoint_every_steps
        due = bool(every and state.global_step % every == 0) | checkpoint_time_due(state)  # `|`: both are collective
        if due and state.batch < state.micro_per_epoch:
            save_checkpoint(state)
    bar.close()
    return False


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    full = steps_per_epoch * cfg.train.epochs
    return min(full, cfg.train.max_steps) if cfg.train.max_steps else full


def report_progress(state: State, phase: str) -> None:
    """progress.json in the run folder: epoch, step and an ETA from this process's own pace (validation included)."""
    total = total_steps(state.cfg, state.plan.steps_per_epoch)
    since, first_step = state.started
    done = state.global_step - first_step
    elapsed = time.monotonic() - since
    eta = (total - state.global_step) * elapsed / done if done > 0 and phase != "done" else None
    state.folder.write_progress({"mode": state.cfg.train.mode, "phase": phase, "epoch": state.epoch,
                                 "epochs": state.cfg.train.epochs, "step": state.global_step, "steps": total,
                                 "eta_s": eta, "updated": time.time()})


def checkpoint_time_due(state: State) -> bool:
    """train.checkpoint_every_min: rank 0's clock decides and every rank follows (saving a checkpoint is collective,
    and ranks' clocks differ); one tiny broadcast per optimizer step, only when the option is on."""
    minutes = state.cfg.train.checkpoint_every_min
    if not minutes:
        return False
    due = time.monotonic() - state.last_save_time >= minutes * 60
    if state.world == 1:
        return due
    flag = torch.tensor([float(due)], device=state.device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def log_scalars(state: State, images_per_s: float) -> None:
    n = state.meter.pop("_n", 1.0)
    for k, v in state.meter.items():
        state.writer.add_scalar(f"loss/{k}", v / n, state.global_step)
    state.meter.clear()
    state.writer.add_scalar("lr", state.engine.get_lr()[0], state.global_step)
    state.writer.add_scalar("throughput/images_per_s", images_per_s, state.global_step)
    if state.device.type == "cuda":  # peak since the last log: whole tissues vary, so the peak is what matters
        state.writer.add_scalar("memory/peak_allocated_gib", torch.cuda.max_memory_allocated(state.device) / 2**30,
                                state.global_step)
        torch.cuda.reset_peak_memory_stats(state.device)


def log_images(state: State, batch: dict[str, Any]) -> None:
    """A few inputs, un-standardised: the teacher's at 10x (teacher mode, and beside the student's in distill), the
    student's at its magnification. Non-finite images (bad manifest stats) are not logged: they draw nothing."""
    if state.rank != 0:
        return
    n = state.cfg.log.num_images
    role = "teacher" if state.cfg.train.mode == "teacher" else "student"
    slots = [("x", role, model_mag(state.cfg))] + ([("t", "teacher", state.cfg.data.teacher_mag)] if "t" in batch else [])
    for slot, who, mag in slots:
        s = state.plan.stats[mag_name(mag)]
        mean, std = torch.tensor(s["mean"]).view(1, 3, 1, 1), torch.tensor(s["std"]).view(1, 3, 1, 1)
        images = batch[slot][:n].float().cpu() * std + mean
        if torch.isfinite(images).all():
            state.writer.add_images(f"inputs/{who}_{mag_name(mag)}", images.clamp(0, 1), state.global_step)


@torch.no_grad()
def validate(state: State) -> dict[str, Any]:
    """Every val sample exactly once, split across ranks; predictions gathered to all ranks for the metrics."""
    if state.plan.val is None:
        return {}
    cfg = state.cfg
    spec = stream_spec(cfg, state.plan, state.rank, state.world, epoch=0, start_batch=0, val=True)
    module = state.engine.module
    module.eval()
    rows, first_bad = [], None
    for batch in make_loader(spec, cfg.data.num_workers, pin_memory=state.device.type == "cuda"):
        batch = finish_batch(batch, state.device, state.dtype)
        x = batch["x"]
        s_feat, logits = module(x)
        if first_bad is None and not torch.isfinite(logits).all():
            first_bad = batch  # an argmax of NaN logits would be scored as class 0
        row = {"key": batch["key"][0], "y": int(batch["y"][0]), "pred": int(logits.float().argmax(1)[0])}
        if state.teacher is not None:
            from hpcdistill.losses import distill_loss

            t_feat, t_logits = teacher_val_outputs(state, batch)
            row["teacher_pred"] = int(t_logits.float().argmax(1)[0])
            row["loss"] = float(distill_loss(s_feat.float(), logits.float(), t_feat.float(), t_logits.float(),
                                             cfg.train.temperature, tuple(cfg.train.pixel_resize))["total"])
        elif row["y"] >= 0:
            row["loss"] = float(F.cross_entropy(logits.float(), batch["y"].to(state.device)))
        rows.append(row)
    module.train()
    if any_rank(first_bad is not None, state.device):
        where = f" on {first_bad['key'][0]}" if first_bad is not None else " on another rank"
        stop_on_divergence(state, [first_bad] if first_bad is not None else [],
                           f"validation after step {state.global_step} (epoch {state.epoch}): outputs are not "
                           f"finite{where}")
    gathered: list[list[dict[str, Any]]] = [rows]
    if state.world > 1:
        gathered = [None] * state.world  # type: ignore[list-item]
        torch.distributed.all_gather_object(gathered, rows)
    rows = sorted((r for part in gathered for r in part), key=lambda r: r["key"])
    return val_metrics(rows, cfg.model.num_classes)


TEACHER_VAL_CACHE_BYTES = 256 * 2**20


def teacher_val_outputs(state: State, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's (features, logits) for a validation sample. Validation images are not augmented, so
    these never change during a run: kept after the first validation (up to TEACHER_VAL_CACHE_BYTES; the rest is
    recomputed) instead of recomputed every epoch, where the teacher's 10x forward is most of validation's cost."""
    key = batch["key"][0]
    if key in state.teacher_val:
        return state.teacher_val[key]
    outputs = state.teacher(batch["t"].to(state.device, state.dtype))
    size = sum(t.numel() * t.element_size() for t in outputs)
    if state.teacher_val_bytes + size <= TEACHER_VAL_CACHE_BYTES:
        state.teacher_val[key] = outputs
        state.teacher_val_bytes += size
    return outputs


def val_metrics(rows: list[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    from hpcdistill.metrics import classification_metrics

    out: dict[str, Any] = {"samples": len(rows)}
    labeled = [r for r in rows if r["y"] >= 0]
    if labeled:
        m = classification_metrics([r["y"] for r in labeled], [r["pred"] for r in labeled], num_classes)
        out.update({k: m[k] for k in ("accuracy", "f1", "precision", "recall")})
        out["top1"] = sum(r["y"] == r["pred"] for r in labeled) / len(labeled)  # plain accuracy, beside OvR accuracy
    if rows and "teacher_pred" in rows[0]:
        out["agreement"] = sum(r["pred"] == r["teacher_pred"] for r in rows) / len(rows)  # collapse shows here
    losses = [r["loss"] for r in rows if "loss" in r]
    if losses:
        out["loss"] = sum(losses) / len(losses)
    return out


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def select_metric(cfg: Config) -> str:
    if cfg.train.select_metric != "auto":
        return cfg.train.select_metric
    return "agreement" if cfg.train.mode == "distill" else "accuracy"


def end_epoch(state: State) -> None:
    """Validate, keep the best export, advance, checkpoint (after validation: a resume never repeats it)."""
    report_progress(state, "validate")
    metrics = validate(state)
    state.last_val = metrics
    for k, v in _scalars(metrics).items():
        state.writer.add_scalar(f"val/{k}", v, state.global_step)
    name = select_metric(state.cfg)
    if metrics and name not in metrics:
        raise TrainError(f"train.select_metric: {name!r} is not a val metric (have {', '.join(_scalars(metrics))})")
    value = metrics.get(name)
    loss = metrics.get("loss", math.inf)
    # A small val set saturates (e.g. accuracy 1.0 at several epochs): among tied epochs keep the lowest val loss.
    if value is None or state.best is None or value > state.best or (value == state.best and loss < state.best_loss):
        state.best, state.best_step, state.best_loss = value, state.global_step, loss
        export_weights(state, "best.pt")
    state.epoch += 1
    state.batch = 0
    save_checkpoint(state)


def run(cfg: Config) -> dict[str, Any]:
    """Train as the config says, resuming if asked; returns a summary (best metric, paths, steps)."""
    return fit(build_state(cfg))


def fit(state: State) -> dict[str, Any]:
    """The epoch loop over a built state (separate from `run` so tests can inspect each rank's engine after)."""
    cfg = state.cfg
    stopped = False
    # A rerun of a finished run (a requeue or relaunch after the last step) only reports: its exports and hparams exist.
    done_before = state.epoch >= cfg.train.epochs and (cfg.run_dir / "last.pt").is_file()
    state.started = (time.monotonic(), state.global_step)
    report_progress(state, "train")
    try:
        while state.epoch < cfg.train.epochs and not stopped:
            stopped = train_epoch(state)
            if stopped:
                save_checkpoint(state)
            else:
                end_epoch(state)
                stopped = bool(cfg.train.max_steps and state.global_step >= cfg.train.max_steps)
        if not done_before:
            export_weights(state, "last.pt")
        report_progress(state, "stopped" if stopped else "done")
        barrier()
        if not stopped and not done_before:
            hparams = {"mode": cfg.train.mode, "arch": cfg.model.arch, "mag": model_mag(cfg), "lr": cfg.train.lr,
                       "grad_accum": cfg.train.grad_accum, "temperature": cfg.train.temperature,
                       "pixel_resize": "+".join(cfg.train.pixel_resize) or "none", "stem": cfg.model.stem}
            state.writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in _scalars(state.last_val).items()},
                                     run_name=".")
    finally:
        state.writer.close()
    return {
        "run_dir": str(cfg.run_dir), "mode": cfg.train.mode, "epoch": state.epoch, "global_step": state.global_step,
        "stopped_early": stopped, "select_metric": select_metric(cfg), "best": state.best, "best_step": state.best_step,
        "best_path": str(cfg.run_dir / "best.pt"), "last_path": str(cfg.run_dir / "last.pt"),
        "last_checkpoint": state.last_ckpt, "val": _scalars(state.last_val),
    }


train = run  # `engine.train(cfg)` reads naturally at call sites; the same entry point


def main_train(argv: list[str]) -> int:
    """`hpcdistill train CONFIG [key=value ...]`."""
    if not argv:
        raise HpcdistillError("train: usage: hpcdistill train CONFIG.yaml [key=value ...]")
    summary = run(load_config(argv[0], argv[1:]))
    if summary and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2), file=sys.stdout)
    return 0
