"""A training run's state and how it is built: the student and frozen teacher, the DeepSpeed engine, TensorBoard,
and the glue to the run folder (save, resume with the config comparison first, export). The loop is engine.py."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpcdistill.common.console import say
from hpcdistill.common.errors import TrainError
from hpcdistill.common.mags import mag_name
from hpcdistill.config.schema import Config, resolve_path
from hpcdistill.data.device_batch import require_device_decode
from hpcdistill.models.export import load_exported
from hpcdistill.models.inference import smallest_input
from hpcdistill.shards.manifest import manifest_digest, shard_source
from hpcdistill.slides.windows import DEFAULT_WINDOWING
from hpcdistill.train.budget import SCHEDULE_KEYS, scheduled, start_schedule, stop_reason
from hpcdistill.train.data_plan import DataPlan, plan_data
from hpcdistill.train.distributed import device_for, ranks_markdown, record_ranks, setup_distributed
from hpcdistill.train.ds_config import build_ds_config
from hpcdistill.train.ema import WeightAverage
from hpcdistill.train.run_folder import RunFolder, apply_resumable, check_resume_config, use_weights_only_loads
from hpcdistill.train.selection import Selection, restore_selections, selections_for, uses_ema
from hpcdistill.train.teacher_gate import check_teacher


def build_student(cfg: Config, classes: list[str]) -> torch.nn.Module:
    from hpcdistill.models.resnet import build_model

    m = cfg.model
    if m.num_classes != len(classes):
        raise TrainError(f"model.num_classes: {m.num_classes}, but the manifest has {len(classes)} classes {classes}")
    torch.manual_seed(cfg.run.seed)
    model = build_model(m.arch, m.num_classes, width=m.width, groups=m.groups, stem=m.stem)
    if m.init:
        init = load_exported(resolve_path(m.init), expect_classes=m.num_classes)
        check_classes("model.init", m.init, init.classes, classes)
        if init.arch_kwargs != model.arch_kwargs:
            raise TrainError(f"model.init: {m.init} is {init.arch_kwargs}, but the config builds {model.arch_kwargs}")
        if not math.isclose(init.mag, cfg.model_mag):
            raise TrainError(
                f"model.init: {m.init} was trained at {mag_name(init.mag)}, this run is at {mag_name(cfg.model_mag)}"
            )
        model.load_state_dict(init.model.state_dict())
    if cfg.train.mode == "finetune":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("fc."))  # the paper freezes everything but the fully connected layer
    return model


def check_input_sides(cfg: Config, manifest: dict, student: torch.nn.Module, teacher: torch.nn.Module | None) -> None:
    """A sample smaller than a network's smallest input fails deep in a forward pass mid-epoch: refused before
    training, from the smallest side the manifest records per magnification (absent in older manifests)."""
    shards = cfg.data.shards
    networks = [(cfg.model_mag, student)] + ([(cfg.data.teacher_mag, teacher)] if teacher is not None else [])
    for mag, network in networks:
        recorded = manifest.get("sizes", {}).get(mag_name(mag), {}).get("min_side")
        needed = smallest_input(network, next(network.parameters()).device)
        if recorded is not None and recorded < needed:
            raise TrainError(
                f"{shards}: its smallest sample is {recorded} px a side at {mag_name(mag)}, under the {needed} px "
                f"the network takes; shard again with --min-side {needed} (or a wider model)"
            )


def memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def model_input(state: State, images: torch.Tensor) -> torch.Tensor:
    """A batch of images on the training device, in its dtype and the model's memory format."""
    return images.to(state.device, state.dtype).contiguous(memory_format=memory_format(state.cfg))


def compile_modules(cfg: Config, *modules: torch.nn.Module | None) -> None:
    """train.compile: each module's forward compiled in place (Module.compile keeps parameter names, so checkpoints
    and exports are the same as without), with dynamic shapes for whole tissues of any size."""
    if cfg.train.compile:
        for module in modules:
            if module is not None:
                module.compile(dynamic=True)


def check_classes(key: str, path: str, trained: list[str], classes: list[str]) -> None:
    """A teacher or an init trained on other class names, or the same names in another order, would pair every soft
    target or class weight with the wrong class: refused in one line showing both lists."""
    if list(trained) != list(classes):
        order = " (the same names in another order)" if sorted(trained) == sorted(classes) else ""
        raise TrainError(
            f"{key}: {path} was trained on classes [{', '.join(trained)}], the shards' are [{', '.join(classes)}]"
            f"{order}; shard with --classes {','.join(trained)} or train it on these shards"
        )


def build_teacher(cfg: Config, classes: list[str]) -> torch.nn.Module:
    teacher = load_exported(resolve_path(cfg.teacher.checkpoint), expect_classes=cfg.model.num_classes)
    check_classes("teacher.checkpoint", cfg.teacher.checkpoint, teacher.classes, classes)
    check_teacher(cfg, teacher)
    if not math.isclose(teacher.mag, cfg.data.teacher_mag):
        raise TrainError(
            f"teacher.checkpoint: trained at {mag_name(teacher.mag)}, data.teacher_mag is "
            f"{mag_name(cfg.data.teacher_mag)}"
        )
    model = teacher.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class NullWriter:
    """TensorBoard stand-in for ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def start_logging(state: State, local_rank: int) -> None:
    """The budget line, TensorBoard (rank 0) and every rank's record of where it runs."""
    if state.rank == 0:
        say(state.plan.budget)
    state.writer = build_writer(state.cfg, state.rank)
    ranks = record_ranks(state.cfg.run_dir, state.rank, state.world, local_rank)
    state.writer.add_text("ranks", ranks_markdown(ranks), state.global_step)


def build_writer(cfg: Config, rank: int) -> Any:
    if rank != 0 or not cfg.log.tensorboard:
        return NullWriter()
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(cfg.run_dir / "tb"))
    text = "    " + json.dumps(cfg.to_dict(), indent=2).replace("\n", "\n    ")  # indented = markdown code block
    writer.add_text("config", text, 0)
    return writer


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
    selections: list[Selection] = field(default_factory=list)  # best.pt first, then train.export_also's
    ema: WeightAverage | None = None  # train.ema_decay > 0
    last_ckpt: str = ""
    last_save_time: float = field(default_factory=time.monotonic)  # for train.checkpoint_every_min
    started: tuple[float, int] = (0.0, 0)  # (monotonic time, global step) when this process began training: the ETA
    teacher_val: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    teacher_val_bytes: int = 0
    last_val: dict[str, Any] = field(default_factory=dict)
    stale: int = 0  # validations since best.pt's metric last improved (train.patience)
    stop_reason: str = ""  # set by the validation that ends the run (budget.stop_reason)
    epoch_meter: dict[str, float] = field(default_factory=dict)  # this epoch's training losses, for its val line
    meter: dict[str, float] = field(default_factory=dict)

    @property
    def micro_per_epoch(self) -> int:
        return self.plan.steps_per_epoch * self.cfg.train.grad_accum


def skip_single_rank_allreduce(engine: Any, world: int) -> None:
    """With one rank there is nothing to reduce, but DeepSpeed still flattens, all-reduces and copies back every
    gradient after each backward (~4% of a ResNet-18 step on CPU): switch that path off."""
    if world == 1:
        engine.enable_backward_allreduce = False


def _resume_changes(cfg: Config, folder: RunFolder, target: Path | None) -> list[str]:
    """The resumable settings this run changes against the checkpoint it resumes; any other change is refused."""
    stored, manifest_sha256 = folder.stored_config(target) if target is not None else (None, None)
    if target is None or stored is None:
        return []
    now = manifest_digest(resolve_path(cfg.data.shards))
    if manifest_sha256 is not None and manifest_sha256 != now:
        raise TrainError(
            f"data.shards: {cfg.data.shards} is not the data {target} was trained on (manifest sha256 "
            f"{manifest_sha256[:12]}, now {(now or 'none')[:12]}): the shards were re-made or replaced; start a new "
            f"run, e.g. run.name={cfg.run.name}-2"
        )
    changes = check_resume_config(
        stored, cfg.to_dict(), target, cfg.run.name, manifest_sha256 is not None, defaults=Config().to_dict()
    )
    bent = [c for c in changes if c.split(":")[0] in SCHEDULE_KEYS and scheduled(cfg)]
    if bent:
        raise TrainError(
            f"{target}: cannot resume with a changed {', '.join(bent)} under an lr schedule (train.schedule, "
            f"train.warmup_fraction): it would bend the schedule the run is on; start a new run, e.g. "
            f"run.name={cfg.run.name}-2"
        )
    return changes


def check_device_options(cfg: Config, device: torch.device) -> None:
    """Options that need a GPU, refused in one line on another device."""
    if cfg.data.decode == "gpu":
        require_device_decode(device)
    if cfg.train.channels_last and device.type == "cpu":
        raise TrainError(
            "train.channels_last: a GPU layout, refused on CPU: there it gains nothing, and torch 2.13's CPU backward "
            "was seen to corrupt the heap with it at model.width=8 (README, reliability); set it false"
        )


def build_state(cfg: Config) -> State:
    """Everything a run needs, resumed from its run folder as `run.resume` says. The config stored in the
    checkpoint is compared first, so a refused change stops before any model is built."""
    rank, world, local = setup_distributed()  # first: it settles DeepSpeed's accelerator before deepspeed is imported
    import deepspeed

    folder = RunFolder(cfg.run_dir, rank)
    target = folder.resume_target(cfg.run.resume)
    changes = _resume_changes(cfg, folder, target)
    device = device_for(local)
    check_device_options(cfg, device)
    plan = plan_data(cfg, world)
    ds_config = build_ds_config(cfg, world, on_cpu=device.type == "cpu", steps_per_epoch=plan.steps_per_epoch)
    model = build_student(cfg, plan.classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    engine.module.to(memory_format=memory_format(cfg))  # after initialize: its broadcast views weights as bytes
    skip_single_rank_allreduce(engine, world)
    use_weights_only_loads(engine)
    dtype = next(engine.module.parameters()).dtype
    teacher = (
        build_teacher(cfg, plan.classes).to(device, dtype=dtype, memory_format=memory_format(cfg))
        if cfg.train.mode == "distill"
        else None
    )
    state = State(
        cfg,
        rank,
        world,
        device,
        engine,
        teacher,
        plan,
        NullWriter(),
        dtype,
        folder,
        selections=selections_for(cfg.select_metric, cfg.train.export_also),
        ema=WeightAverage(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay else None,
    )
    check_input_sides(cfg, plan.manifest, engine.module, teacher)
    compile_modules(cfg, engine.module, teacher)  # after the EMA copy: a copied compiled forward calls the original
    if target is not None:
        resume(state, target, changes)
    else:
        start_schedule(engine)
    start_logging(state, local)
    folder.write_config(cfg.to_dict())  # only now: a refused resume leaves the run's config.yaml as it was
    return state


def save_checkpoint(state: State) -> str:
    client = {
        "epoch": state.epoch,
        "batch": state.batch,
        "global_step": state.global_step,
        "selections": [sel.to_dict() for sel in state.selections],
        "last_val": scalars(state.last_val),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "manifest_sha256": state.plan.manifest_sha256,  # the data's identity, whatever path it is read from
        "world": state.world,  # a mid-epoch position is per rank: another world size would skip or repeat samples
        "stale": state.stale,
        "per_rank": state.plan.per_rank,  # the epoch's size: a resume mid-epoch must cut the epoch the same way
    }
    if state.ema is not None:
        client["ema"] = state.ema.state_dict()
    path = state.folder.save_checkpoint(
        state.engine, state.global_step, client, state.cfg.to_dict(), state.cfg.train.keep_last
    )
    state.last_ckpt = str(path)
    state.last_save_time = time.monotonic()
    # TensorBoard is on disk up to the checkpoint: a hard kill (preemption) loses only the rerun part
    state.writer.flush()
    return state.last_ckpt


def resume(state: State, target: Path, changes: list[str]) -> None:
    """Restore weights, optimizer, position in the data and RNG from `target`; then apply the config's resumable
    settings (lr, weight decay) over the optimizer state's, and say where the run goes on from."""
    client = state.folder.load_checkpoint(state.engine, target)
    changes = changes + _world_change(state, target, client.get("world"), client["batch"])  # before anything moves
    changes += _epoch_size_change(state, target, client.get("per_rank"), client.get("world"), client["batch"])
    apply_resumable(state.engine, state.cfg.train, scheduled=state.engine.lr_scheduler is not None)
    newer = [p for p in state.folder.complete_checkpoints() if p.name > target.name]
    if newer:  # run.resume named an older checkpoint: a later requeue must not jump back to the abandoned future
        state.folder.set_aside(newer, f"superseded: the run was resumed from {target}", ".superseded")
    state.epoch, state.batch, state.global_step = client["epoch"], client["batch"], client["global_step"]
    state.last_val = client.get("last_val", {})
    state.stale = client.get("stale", 0)
    if state.ema is not None:
        state.ema.load_state_dict(client["ema"])  # present: ema_decay cannot change on resume
    torch.set_rng_state(client["torch_rng"])
    random.setstate(client["python_rng"])
    state.last_ckpt = str(target)
    note = f"; changed on resume: {', '.join(changes)}" if changes else ""
    note += "".join(f"; {stale}" for stale in restore_selections(state.selections, client, state.folder.export_step))
    best = state.selections[0]
    if state.batch == 0 and state.epoch > 0:  # recomputed, not stored: a resumable change of the budget counts
        state.stop_reason = stop_reason(state.cfg, state.epoch, state.stale, best.value, best.step) or ""
    say(
        f"resuming from {target} (step {state.global_step}, epoch {state.epoch}, micro-batch {state.batch} of the "
        f"epoch){note}"
    )


def _epoch_size_change(state: State, target: Path, saved: int | None, world: int | None, batch: int) -> list[str]:
    """The same ranks but another epoch size (the data or the rule that sizes epochs changed): refused mid-epoch,
    said at an epoch's end."""
    now = state.plan.per_rank
    if saved is None or saved == now or world != state.world:
        return []
    if batch:
        raise TrainError(
            f"{target}: saved mid-epoch with {saved} samples per rank per epoch, this run makes {now} "
            f"({state.plan.epoch_rule}): resume as it was, change at an epoch's end"
        )
    return [f"samples per rank per epoch {saved} -> {now}"]


def _world_change(state: State, target: Path, saved: int | None, batch: int) -> list[str]:
    """Another number of ranks: refused mid-epoch (each rank's position in its share of the epoch would skip or
    repeat samples), said at an epoch boundary (the global batch changes)."""
    if saved is None or saved == state.world:
        return []
    if scheduled(state.cfg):
        raise TrainError(
            f"{target}: saved by {saved} rank(s); with {state.world} an epoch has another number of steps and the "
            f"lr schedule would no longer end with the run: resume with {saved} rank(s)"
        )
    if batch:
        raise TrainError(
            f"{target}: saved by {saved} rank(s) mid-epoch (micro-batch {batch}); resuming with {state.world} "
            f"would skip or repeat samples of the epoch: resume with {saved} rank(s) and change at an epoch's end"
        )
    per_rank = state.cfg.train.micro_batch * state.cfg.train.grad_accum
    return [
        f"ranks {saved} -> {state.world}: the global batch changes from {saved * per_rank} to {state.world * per_rank}"
    ]


def export_weights(state: State, name: str, ema: bool = False, val: dict[str, float] | None = None) -> None:
    """The training weights (or with `ema`, their moving average) as a plain export in the run folder, with the
    validation metrics it was picked on (default: the last validation's)."""
    mag = state.cfg.model_mag
    module = state.ema.module if ema and state.ema is not None else state.engine.module
    state.folder.export_weights(
        name,
        module,
        mag=mag,
        classes=state.plan.classes,
        stats=state.plan.stats[mag_name(mag)],
        config=state.cfg.to_dict(),
        global_step=state.global_step,
        windowing=training_windowing(state.plan.manifest),
        source=shard_source(state.plan.manifest),
        val=scalars(state.last_val) if val is None else val,
    )


def training_windowing(manifest: dict[str, Any]) -> dict[str, Any]:
    """How the training shards cut tissues (from their manifest), stored in exports for prediction."""
    params = manifest.get("params") or {}
    return {key: params.get(key, default) for key, default in DEFAULT_WINDOWING.items()}


def export_selection(state: State, sel: Selection) -> None:
    export_weights(state, sel.file, ema=uses_ema(sel.metric), val=sel.at_pick)


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
