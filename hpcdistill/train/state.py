"""A training run in two parts: `Trainer`, what was built for it once (config, ranks, device, the DeepSpeed engine,
the frozen teacher, the weight average, the data plan, TensorBoard, the run folder), and `State`, what changes as it
trains (position, selections, the last validation, the stop rule's count, meters). A checkpoint stores `State`'s
resumable fields (`State.checkpoint_fields`, `State.restore`); building is build.py, resuming resume.py, saving and
exporting checkpointing.py, the loop loop.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from hpcdistill.config.schema import Config
from hpcdistill.train.data_plan import DataPlan
from hpcdistill.train.ema import WeightAverage
from hpcdistill.train.run_folder import RunFolder
from hpcdistill.train.selection import Selection


@dataclass
class State:
    """What changes as the run trains. The first six fields are saved in every checkpoint and restored on resume."""

    epoch: int = 0
    batch: int = 0  # micro-batches consumed in the current epoch
    global_step: int = 0  # optimizer steps
    stale: int = 0  # validations since best.pt's metric last improved (train.patience)
    last_val: dict[str, Any] = field(default_factory=dict)
    selections: list[Selection] = field(default_factory=list)  # best.pt first, then train.export_also's
    last_ckpt: str = ""
    last_save_time: float = field(default_factory=time.monotonic)  # for train.checkpoint_every_min
    started: tuple[float, int] = (0.0, 0)  # (monotonic time, global step) when this process began training: the ETA
    stop_reason: str = ""  # set by the validation that ends the run (budget.stop_reason)
    teacher_val: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # frozen outputs, by key
    teacher_val_bytes: int = 0
    epoch_meter: dict[str, float] = field(default_factory=dict)  # this epoch's training losses, for its val line
    meter: dict[str, float] = field(default_factory=dict)  # training losses since the last scalar log
    last_progress_line: float = 0.0  # monotonic time of the last plain progress line (output not a terminal)

    def checkpoint_fields(self) -> dict[str, Any]:
        """The position and the stop rule's memory, as a checkpoint's client state stores them."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "global_step": self.global_step,
            "stale": self.stale,
            "last_val": scalars(self.last_val),
            "selections": [sel.to_dict() for sel in self.selections],
        }

    def restore(self, client: dict[str, Any]) -> None:
        """Position, last validation and stale count from a checkpoint's client state (selections: resume.py)."""
        self.epoch, self.batch, self.global_step = client["epoch"], client["batch"], client["global_step"]
        self.last_val = client.get("last_val", {})
        self.stale = client.get("stale", 0)


@dataclass
class Trainer:
    """What a run builds once (build.py), and its `State`."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    engine: Any  # the DeepSpeed engine; `engine.module` is the student
    teacher: torch.nn.Module | None  # frozen, distill mode only
    ema: WeightAverage | None  # train.ema_decay > 0
    plan: DataPlan
    writer: Any  # rank 0: TensorBoard's SummaryWriter inside a MetricsLog (metrics.jsonl); a NullWriter elsewhere
    dtype: torch.dtype
    folder: RunFolder
    state: State = field(default_factory=State)

    @property
    def micro_per_epoch(self) -> int:
        return self.plan.steps_per_epoch * self.cfg.train.grad_accum


def memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def model_input(trainer: Trainer, images: torch.Tensor) -> torch.Tensor:
    """A batch of images on the training device, in its dtype and the model's memory format."""
    return images.to(trainer.device, trainer.dtype).contiguous(memory_format=memory_format(trainer.cfg))


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
