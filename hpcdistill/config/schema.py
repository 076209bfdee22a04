"""The training run's typed configuration tree: one dataclass per section, the defaults, the choices models, losses
and the CLI read (arch, stem, resize, precision), and `resolve_path` for the paths a config names. Loading YAML and
overrides into it is loading.py; its checks are checks.py. Every rejection is one line naming the dotted key, e.g.
"train.lr: expected float, got 'abc'"."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hpcdistill.common.files import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # configs/ as installed package data (pyproject.toml)


def resolve_path(path: str) -> Path:
    """A path named in a config: as given (relative to the working directory), else relative to the repository
    (configs/...), else, for configs/..., the copy installed with the package: a `pip install .` works anywhere."""
    p = Path(path)
    if p.is_absolute() or p.exists() or (REPO_ROOT / p).exists():
        return p if p.is_absolute() or p.exists() else REPO_ROOT / p
    installed = PACKAGE_CONFIGS.joinpath(*p.parts[1:]) if p.parts[:1] == ("configs",) else None
    return installed if installed is not None and installed.exists() else REPO_ROOT / p


# The choices below are the one source of each list: models, losses and the CLI read them from here (this module
# imports no torch, so the launcher can validate configs without it).
Mode = Literal["teacher", "baseline", "distill", "finetune"]
Arch = Literal["resnet10", "resnet18", "resnet34", "resnet50"]
Stem = Literal["standard", "halfres", "lowres"]
Resize = Literal["maxpool", "bicubic"]  # the pixel loss's resize functions g (losses.pixel_loss)
Precision = Literal["fp32", "bf16", "fp16"]
# Validation metrics an export can be selected on (selection.py): kl and loss lower-is-better, the rest higher;
# agreement and kl (with the teacher) exist only in distill; ema_* score the EMA weights (train.ema_decay > 0).
SelectMetric = Literal[
    "auto",
    "accuracy",
    "f1",
    "precision",
    "recall",
    "top1",
    "agreement",
    "kl",
    "loss",
    "ema_accuracy",
    "ema_f1",
    "ema_precision",
    "ema_recall",
    "ema_top1",
    "ema_agreement",
    "ema_kl",
    "ema_loss",
]
ARCHS: tuple[str, ...] = typing.get_args(Arch)
STEMS: tuple[str, ...] = typing.get_args(Stem)
RESIZES: tuple[str, ...] = typing.get_args(Resize)


@dataclass
class RunConfig:
    # The run directory is out_dir/name, checkpoints and logs inside. A template: {mode}, {mag} (the network's
    # magnification, e.g. 1.25) and {seed} are filled in at load, so one config serves every magnification.
    name: str = "{mode}-{mag}x"
    out_dir: str = "runs"
    seed: int = 0  # model init and every augmentation draw derive from it, so runs are reproducible
    # "auto": latest complete checkpoint in the run dir; "never": refuse to reuse a run dir; "overwrite": start over,
    # the run dir's earlier results (checkpoints, exports, logs, eval/) removed first (`train --overwrite`); or a
    # checkpoint path
    resume: str = "auto"


@dataclass
class AugmentConfig:
    """Applied identically to both images of a KD pair (same draw), so teacher and student see the same tissue."""

    flips: bool = True  # random horizontal and vertical flips (paper §3.2)
    rot90: bool = True  # random multiples of 90 degrees: exact on pixels, no interpolation
    brightness: float = (
        0.25  # factor drawn from [1-b, 1+b]; colour jitter is the paper's minimum defence against stain overfit
    )
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.05  # shift drawn from [-h, h] of a full turn (h <= 0.5)
    # Stain jitter in haematoxylin-eosin-DAB space (data/augment.py): each stain's optical density scaled by a factor
    # from [1-h, 1+h] and shifted by [-h, h]; 0 = off (the paper's recipe).
    hed: float = 0.0


@dataclass
class DataConfig:
    shards: str = "shards"  # directory holding manifest.json; relative set entries resolve against it
    # Each entry is a split name from the manifest ("train", "aux1") or a brace-notation URL/path pattern
    # ("train-{000000..000003}.tar", "/data/adv2/aux-{000000..000009}.tar"). Several entries are read together.
    train: list[str] = field(default_factory=lambda: ["train"])
    val: list[str] = field(default_factory=lambda: ["val"])
    aux: list[str] = field(
        default_factory=list
    )  # unlabeled sets; distill reads train + aux (set train: [] for aux only)
    mag: float = 2.5  # the magnification this run's model sees (teacher mode: forced to teacher_mag)
    teacher_mag: float = 10.0
    # Samples per epoch over all ranks; 0 = data.epoch_passes over the labelled train sets. Each rank runs exactly
    # ceil(epoch_samples / world) samples (rounded down to whole optimizer steps) so no rank waits on another.
    epoch_samples: int = 0
    # With epoch_samples 0, an epoch is this many passes over the labelled training tissues (the data.train sets;
    # aux sets add variety, not length, so every method gets the same steps): the budget follows the data.
    epoch_passes: float = 1.0
    # "resampled": each rank/worker draws shards with replacement (scales, the default for real runs);
    # "ordered": one global sample order strided across ranks, so a run is independent of the world size
    # (tests, audits).
    sampler: Literal["resampled", "ordered"] = "resampled"
    shuffle_buffer: int = 64  # samples buffered for shuffling within the streamed shards (resampled mode)
    num_workers: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # The classes as an ordered scale (e.g. [normal, duodenitis, celiac]), the manifest's class order or its reverse:
    # Cohen's kappa is then quadratic-weighted (a call two grades off costs 4x one grade off); [] = nominal classes,
    # unweighted kappa.
    ordinal_classes: list[str] = field(default_factory=list)
    # Where JPEGs are decoded: "cpu", by the loader workers (PIL, libjpeg-turbo); "gpu", on the training GPU with
    # nvJPEG (needs `pip install hpcdistill[gpu]`: torchvision), the workers then only read bytes. Refused on a CPU run.
    decode: Literal["cpu", "gpu"] = "cpu"


@dataclass
class ModelConfig:
    arch: Arch = "resnet18"
    width: int = 64
    groups: int = (
        32  # GroupNorm groups (capped at channels): batch-size independent, so micro-batch 1 + accumulation is exact
    )
    stem: Stem = "standard"  # lighter stems keep detail in small low-mag inputs at more FLOPs (models.py)
    num_classes: int = 3
    init: str = ""  # exported weights (best.pt) to start from: the distilled student for finetune


@dataclass
class TeacherRef:
    checkpoint: str = ""  # the teacher run's exported best.pt; its arch_kwargs rebuild the network
    # The gate before distillation (train/teacher_gate.py): the export's recorded validation accuracy (macro
    # one-vs-rest, as the reports) must reach this floor, and beat the reference export's when one is named (e.g. the
    # baseline at the student's magnification). "refuse" stops in one line, "warn" says it and goes on.
    min_val_accuracy: float = 0.8
    reference: str = ""
    gate: Literal["refuse", "warn"] = "refuse"


@dataclass
class TrainConfig:
    mode: Mode = "teacher"
    epochs: int = 100  # paper: 100 epochs of Adam at lr 1e-3
    lr: float = 1e-3
    # "constant" (the paper's), or "cosine": decay to lr x min_lr_ratio at the end of train.epochs (an extension
    # to max_epochs stays there); either after a linear warm-up over this fraction of the steps (0 = none). Stepped
    # per optimizer step by DeepSpeed (train/budget.py).
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.01
    # Stop when the selection metric has not improved for this many validations (0 = run the budget); with
    # max_epochs > epochs, a run still improving at `epochs` goes on until the plateau or max_epochs.
    patience: int = 0
    max_epochs: int = 0
    weight_decay: float = 0.0  # explicit: DeepSpeed's torch Adam otherwise defaults to 0.01
    grad_accum: int = 16  # micro-batch 1 whole tissues + accumulation, as in the paper
    micro_batch: int = 1
    # Group crops of similar size into micro-batches and centre-crop each batch to its smallest member: more
    # images per kernel launch (GPU efficiency) at the cost of losing tissue borders of the larger crops.
    bucketed: bool = False
    bucket_window: int = 8  # micro-batches' worth of samples sorted by size together (bucketed mode)
    # NHWC memory format for the model and its inputs: the layout GPU convolution kernels (tensor cores) run fastest.
    channels_last: bool = False
    # torch.compile the student (and the frozen teacher) with dynamic shapes: whole tissues differ in size, so one
    # graph serves every H x W (README "The GPU path": when it recompiles).
    compile: bool = False
    temperature: float = 4.0
    pixel_resize: list[Resize] = field(default_factory=lambda: list(RESIZES))  # a subset; [] = KD only
    checkpoint_every_steps: int = 0  # optimizer steps between mid-epoch checkpoints; 0 = only at epoch ends
    # Minutes of training between mid-epoch checkpoints (rank 0's clock), however fast the steps: bounds the work a
    # preemption or time limit can lose on any GPU. Either cadence or both; 0 = off.
    checkpoint_every_min: float = 0.0
    keep_last: int = 3
    max_steps: int = 0  # stop (with a checkpoint) after this many optimizer steps in total; 0 = run all epochs
    select_metric: SelectMetric = "auto"  # val metric for best.pt; "auto": Config.select_metric
    # Keep an exponential moving average of the weights (decay per optimizer step, warmed up over the first steps):
    # validation then also scores it (the ema_* metrics), and last-ema.pt holds it at the end. 0 = off.
    ema_decay: float = 0.0
    # More selections, each exported as best-<metric>.pt beside best.pt: compare picks without retraining.
    export_also: list[SelectMetric] = field(default_factory=list)


@dataclass
class LogConfig:
    tensorboard: bool = True
    log_every: int = 10  # optimizer steps between scalar logs
    images_every: int = 0  # optimizer steps between input-image logs; 0 = first step of each epoch only
    num_images: int = 4
    # A progress bar on a terminal; where output is not one (a SLURM .out file, a pipe), a plain line instead, at most
    # every progress_every_s seconds: a redrawn bar would pile up there as one line of carriage returns.
    progress: bool = True
    progress_every_s: float = 60.0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherRef = field(default_factory=TeacherRef)
    train: TrainConfig = field(default_factory=TrainConfig)
    # DeepSpeed-only settings (optimizer betas/eps, clipping, fp16 loss scaling); what this tree sets (micro-batch,
    # accumulation, lr, weight decay, precision) is refused there (ds_config.py), so the two never disagree.
    deepspeed: str = "configs/deepspeed/zero0.json"
    precision: Precision = "fp32"
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    @property
    def select_metric(self) -> str:
        """The val metric best.pt is chosen on: train.select_metric, where "auto" is the steadiest pick measured on
        the demo over 3 seeds (README "Choosing the export"): in distill the val distillation loss (continuous,
        label-free); otherwise the EMA weights' val accuracy when train.ema_decay keeps them, else val accuracy."""
        if self.train.select_metric != "auto":
            return self.train.select_metric
        if self.train.mode == "distill":
            return "loss"
        return "ema_accuracy" if self.train.ema_decay else "accuracy"

    @property
    def model_mag(self) -> float:
        """The magnification the trained network sees."""
        return self.data.teacher_mag if self.train.mode == "teacher" else self.data.mag
