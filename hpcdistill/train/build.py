"""Building a run: the student (and its init) and the frozen teacher with their class and magnification checks, the
DeepSpeed engine, the options a device must support, TensorBoard, and `build_trainer`, which resumes as
`run.resume` says (the stored config compared first, so a refused change stops before any model is built)."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import torch

from hpcdistill.common.console import say
from hpcdistill.common.errors import TrainError
from hpcdistill.common.mags import mag_name
from hpcdistill.config.schema import Config, resolve_path
from hpcdistill.data.device_batch import require_device_decode
from hpcdistill.models.export import load_exported
from hpcdistill.models.inference import smallest_input
from hpcdistill.shards.manifest import shard_stain
from hpcdistill.slides.stain import stain_mismatch
from hpcdistill.train.budget import start_schedule
from hpcdistill.train.data_plan import plan_data
from hpcdistill.train.distributed import barrier, device_for, ranks_markdown, record_ranks, setup_distributed
from hpcdistill.train.ds_config import build_ds_config
from hpcdistill.train.ema import WeightAverage
from hpcdistill.train.metrics_log import MetricsLog
from hpcdistill.train.resume import resume, resume_changes
from hpcdistill.train.run_folder import RunFolder, use_weights_only_loads
from hpcdistill.train.selection import selections_for
from hpcdistill.train.state import State, Trainer, memory_format
from hpcdistill.train.teacher_gate import check_teacher


def build_student(cfg: Config, classes: list[str]) -> torch.nn.Module:
    from hpcdistill.models.resnet import build_model

    m = cfg.model
    if m.num_classes != len(classes):
        raise TrainError(f"model.num_classes: {m.num_classes}, but the manifest has {len(classes)} classes {classes}")
    if cfg.data.ordinal_classes and cfg.data.ordinal_classes not in (classes, classes[::-1]):
        raise TrainError(  # quadratic weights read only |i - j|: the scale may run either way
            f"data.ordinal_classes: {cfg.data.ordinal_classes}, but the manifest's classes are {classes}: shard with "
            f"--classes {','.join(cfg.data.ordinal_classes)} so the class order is the scale's"
        )
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


def build_teacher(cfg: Config, classes: list[str], manifest: dict) -> torch.nn.Module:
    teacher = load_exported(resolve_path(cfg.teacher.checkpoint), expect_classes=cfg.model.num_classes)
    check_classes("teacher.checkpoint", cfg.teacher.checkpoint, teacher.classes, classes)
    mismatch = stain_mismatch(teacher.stain_norm, shard_stain(manifest), f"{cfg.data.shards} (data.shards)")
    if mismatch:  # the teacher's soft labels would come from colours it never saw
        raise TrainError(f"teacher.checkpoint: {cfg.teacher.checkpoint}: {mismatch}")
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


class _SchedulerStartFilter(logging.Filter):
    """DeepSpeed's warm-up scheduler reads its own learning rate while it is built, and warns that it is read
    "before it has started" in every run: the rate it returns is the warm-up's start, as intended. Dropped, that
    one message only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "before it has started" not in record.getMessage()


def quiet_scheduler_start() -> None:
    ds_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _SchedulerStartFilter) for f in ds_logger.filters):
        ds_logger.addFilter(_SchedulerStartFilter())


class NullWriter:
    """TensorBoard stand-in for ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def start_logging(trainer: Trainer, local_rank: int) -> None:
    """The budget line, TensorBoard (rank 0) and every rank's record of where it runs."""
    if trainer.rank == 0:
        say(trainer.plan.budget)
    trainer.writer = build_writer(trainer.cfg, trainer.rank, trainer.state)
    ranks = record_ranks(trainer.cfg.run_dir, trainer.rank, trainer.world, local_rank)
    trainer.writer.add_text("ranks", ranks_markdown(ranks), trainer.state.global_step)


def build_writer(cfg: Config, rank: int, state: State) -> Any:
    """Rank 0: TensorBoard (unless log.tensorboard is off) with every scalar also in metrics.jsonl; other ranks log
    nothing."""
    if rank != 0:
        return NullWriter()
    writer: Any = NullWriter()
    if cfg.log.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(cfg.run_dir / "tb"))
        text = "    " + json.dumps(cfg.to_dict(), indent=2).replace("\n", "\n    ")  # indented = markdown code block
        writer.add_text("config", text, 0)
    return MetricsLog(writer, cfg.run_dir, state.global_step, lambda: state.epoch + 1)  # epochs as the lines count


def skip_single_rank_allreduce(engine: Any, world: int) -> None:
    """With one rank there is nothing to reduce, but DeepSpeed still flattens, all-reduces and copies back every
    gradient after each backward (~4% of a ResNet-18 step on CPU): switch that path off."""
    if world == 1:
        engine.enable_backward_allreduce = False


def check_device_options(cfg: Config, device: torch.device) -> None:
    """Options that need a GPU, refused in one line on another device."""
    if cfg.data.decode == "gpu":
        require_device_decode(device)
    if cfg.train.channels_last and device.type == "cpu":
        raise TrainError(
            "train.channels_last: a GPU layout, refused on CPU: there it gains nothing, and torch 2.13's CPU backward "
            "was seen to corrupt the heap with it at model.width=8 (README, reliability); set it false"
        )


def start_over(cfg: Config, folder: RunFolder) -> None:
    """`run.resume: overwrite`: rank 0 removes the earlier run's results while every other rank waits."""
    if folder.rank == 0:
        inputs = [cfg.teacher.checkpoint, cfg.teacher.reference, cfg.model.init]
        removed = folder.clear([str(resolve_path(i)) for i in inputs if i])
        if removed:
            say(f"{cfg.run_dir}: run.resume overwrite: removed the earlier run's {', '.join(removed)}")
    barrier()


def build_engine(cfg: Config, world: int, device: torch.device, plan: Any) -> Any:
    """The student inside its DeepSpeed engine, on `device`, ready to train or to resume."""
    import deepspeed

    ds_config = build_ds_config(cfg, world, on_cpu=device.type == "cpu", steps_per_epoch=plan.steps_per_epoch)
    model = build_student(cfg, plan.classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    quiet_scheduler_start()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    engine.module.to(memory_format=memory_format(cfg))  # after initialize: its broadcast views weights as bytes
    skip_single_rank_allreduce(engine, world)
    use_weights_only_loads(engine)
    return engine


def build_trainer(cfg: Config) -> Trainer:
    """Everything a run needs, resumed from its run folder as `run.resume` says. The config stored in the
    checkpoint is compared first, so a refused change stops before any model is built."""
    rank, world, local = setup_distributed()  # first: it settles DeepSpeed's accelerator before deepspeed is imported
    folder = RunFolder(cfg.run_dir, rank)
    device = device_for(local)
    check_device_options(cfg, device)
    plan = plan_data(cfg, world)
    if cfg.run.resume == "overwrite":  # after the checks that can refuse: a refused run removes nothing
        start_over(cfg, folder)
    target = folder.resume_target(cfg.run.resume)
    changes = resume_changes(cfg, folder, target)
    engine = build_engine(cfg, world, device, plan)
    dtype = next(engine.module.parameters()).dtype
    teacher = (
        build_teacher(cfg, plan.classes, plan.manifest).to(device, dtype=dtype, memory_format=memory_format(cfg))
        if cfg.train.mode == "distill"
        else None
    )
    trainer = Trainer(
        cfg,
        rank,
        world,
        device,
        engine,
        teacher,
        WeightAverage(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay else None,
        plan,
        NullWriter(),
        dtype,
        folder,
        State(selections=selections_for(cfg.select_metric, cfg.train.export_also)),
    )
    check_input_sides(cfg, plan.manifest, engine.module, teacher)
    compile_modules(cfg, engine.module, teacher)  # after the EMA copy: a copied compiled forward calls the original
    if target is not None:
        resume(trainer, target, changes)
    else:
        start_schedule(engine)
    start_logging(trainer, local)
    folder.write_config(cfg.to_dict())  # only now: a refused resume leaves the run's config.yaml as it was
    folder.write_provenance()
    return trainer
