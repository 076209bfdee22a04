"""The export format, `best.pt` / `last.pt`: plain weights for inference (tensors, dicts, lists, strings and
numbers only, so `torch.load(weights_only=True)` reads them) with what a reader needs to use them as trained: the
architecture's arguments, the magnification, the class names, the colour statistics, the training config and how
the training shards cut tissues into windows. `export_blob` builds it, `load_exported` reads it back."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpcdistill.common.errors import ExportError, HpcdistillError, one_line
from hpcdistill.common.limits import regular_file
from hpcdistill.common.mags import mag_name
from hpcdistill.models.resnet import build_model
from hpcdistill.slides.mag_scale import OBJECTIVE_SCALE, MagScale
from hpcdistill.slides.stain import StainNorm
from hpcdistill.slides.windows import DEFAULT_WINDOWING, Windowing

EXPORT_KEYS = ("state_dict", "arch_kwargs", "mag", "classes", "stats")


def export_blob(
    module: torch.nn.Module,
    *,
    mag: float,
    classes: list[str],
    stats: dict[str, Any],
    config: dict[str, Any],
    global_step: int,
    windowing: dict[str, Any],
    source: str = "level0",
    mag_scale: dict[str, Any] | None = None,
    stain_norm: dict[str, Any] | None = None,
    val: dict[str, float] | None = None,
    seen: dict[str, list[str]] | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The export of `module` (weights as float32 on the CPU); `global_step` tells a resume whether an export
    belongs to the trajectory it continues; `source`, where the training shards' crops came from; `val`, its
    validation metrics when it was picked (what the teacher gate reads); `seen`, the slides and patients it was
    trained and validated on ({"slides": [...], "patients": [...]}: what scoring leaves out as not a test);
    `mag_scale`, what the shards' magnifications meant (slides.mag_scale; None: the objective power, as before);
    `stain_norm`, the shards' stain normalisation (slides.stain; None: none);
    `provenance`, how it was made (common.provenance)."""
    return {
        "state_dict": {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()},
        "arch_kwargs": dict(module.arch_kwargs),
        "mag": mag,
        "classes": list(classes),
        "config": config,
        "stats": stats,
        "global_step": global_step,
        "windowing": windowing,
        "source": source,
        "mag_scale": mag_scale,
        "stain_norm": stain_norm,
        "val": {k: float(v) for k, v in (val or {}).items()},
        "seen": {k: sorted(map(str, v)) for k, v in (seen or {}).items()},
        "provenance": provenance or {},
    }


@dataclass
class ExportedModel:
    model: torch.nn.Module
    mag: float
    classes: list[str]
    stats: dict  # {"mean", "std"}: per-channel, [0,1] scale, of the labeled train split at `mag`
    arch_kwargs: dict
    path: str
    config: dict  # the run's resolved training config
    windowing: Windowing  # how the training shards cut tissues into windows: prediction cuts the same way
    windowing_recorded: bool = True  # False: an export older than the record, read with the sharder's defaults
    source: str = "level0"  # where its training crops came from (`shard --source`): what `predict` reads by default
    val: dict = field(default_factory=dict)  # validation metrics at the pick ({}: not recorded, an older export)
    seen: dict = field(default_factory=dict)  # {"slides", "patients"} it trained and validated on ({}: not recorded)
    provenance: dict = field(default_factory=dict)  # how it was made (common.provenance; {}: an older export)
    mag_scale: MagScale = OBJECTIVE_SCALE  # what its shards' magnifications meant: how `predict` opens slides
    stain_norm: StainNorm = field(default_factory=StainNorm)  # its shards' stain normalisation: predict's too

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def min_side(self) -> int:
        """The smallest square input the network takes, in pixels at `mag` (found by running it)."""
        from hpcdistill.models.inference import smallest_input

        return smallest_input(self.model, self.device)


def load_exported(
    path: str | Path, *, expect_arch: str | None = None, expect_classes: int | None = None
) -> ExportedModel:
    """Load an exported weights file (best.pt / last.pt); errors name the file and what does not match."""
    path = regular_file(path, ExportError)  # a FIFO or device would block or never end
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises many types for corrupt or pickled files
        raise ExportError(f"{path}: not a loadable weights file ({one_line(err, first_line=True)})") from None
    missing = [k for k in EXPORT_KEYS if not isinstance(blob, dict) or k not in blob]
    if missing:
        raise ExportError(f"{path}: not an hpcdistill export (missing {', '.join(missing)})")
    kwargs = dict(blob["arch_kwargs"])
    if expect_arch is not None and kwargs.get("arch") != expect_arch:
        raise ExportError(f"{path}: architecture {kwargs.get('arch')!r} does not match the expected {expect_arch!r}")
    if expect_classes is not None and kwargs.get("num_classes") != expect_classes:
        raise ExportError(f"{path}: trained for {kwargs.get('num_classes')} classes, but the data has {expect_classes}")
    arch, num_classes = kwargs.pop("arch"), kwargs.pop("num_classes")
    model = build_model(arch, num_classes, **kwargs)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as err:
        raise ExportError(
            f"{path}: weights do not fit {arch} with {num_classes} classes ({one_line(err, first_line=True)})"
        ) from None
    model.eval()
    mag = float(blob["mag"])
    stats = blob["stats"]
    stats = stats.get(mag_name(mag), stats)  # a per-mag table or the stats of this mag only
    return ExportedModel(
        model=model,
        mag=mag,
        classes=list(blob["classes"]),
        stats={"mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]]},
        arch_kwargs=dict(blob["arch_kwargs"]),
        path=str(path),
        config=dict(blob.get("config", {})),
        windowing=Windowing.from_dict(blob.get("windowing") or DEFAULT_WINDOWING),
        windowing_recorded="windowing" in blob,
        source=str(blob.get("source", "level0")),
        val={k: float(v) for k, v in (blob.get("val") or {}).items()},
        seen={k: set(v) for k, v in (blob.get("seen") or {}).items()},
        provenance=dict(blob.get("provenance") or {}),
        mag_scale=_recorded(MagScale, path, blob.get("mag_scale")),
        stain_norm=_recorded(StainNorm, path, blob.get("stain_norm")),
    )


def _recorded(kind: Any, path: Path, record: Any) -> Any:
    """A MagScale or StainNorm the export recorded (None: an export older than the record)."""
    try:
        return kind.from_dict(record, str(path))
    except HpcdistillError as err:
        raise ExportError(str(err)) from None
