"""Exported models for inference: load a weights file safely and classify standardised tissue images.

An exported file (`best.pt` / `last.pt`, written by the engine) is a plain dict of tensors, numbers and strings:
{"state_dict", "arch_kwargs", "mag", "classes", "stats", "config"}, so it loads with `weights_only=True` and
rebuilds the exact architecture from its constructor arguments (nanoGPT's checkpoint style).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpcdistill.data import Standardizer, finish_batch
from hpcdistill.errors import HpcdistillError
from hpcdistill.mags import mag_name
from hpcdistill.models import build_model


@dataclass
class ExportedModel:
    model: torch.nn.Module
    mag: float
    classes: list[str]
    stats: dict  # {"mean", "std"}: per-channel, [0,1] scale, of the labeled train split at `mag`
    arch_kwargs: dict
    path: str
    config: dict  # the run's resolved training config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def pick_device(name: str = "auto") -> torch.device:
    """"auto": the first GPU if there is one, else the CPU; or an explicit "cpu", "cuda", "cuda:N"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HpcdistillError(f"--device {name!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise HpcdistillError(f"--device {name!r}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise HpcdistillError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def load_exported(path: str | Path, *, expect_arch: str | None = None, expect_classes: int | None = None) -> ExportedModel:
    """Load an exported weights file; errors name the file and what does not match."""
    path = Path(path)
    if not path.is_file():
        raise HpcdistillError(f"{path}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises many types for corrupt or pickled files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HpcdistillError(f"{path}: not a loadable weights file ({reason})") from None
    missing = [k for k in ("state_dict", "arch_kwargs", "mag", "classes", "stats") if k not in blob]
    if not isinstance(blob, dict) or missing:
        raise HpcdistillError(f"{path}: not an hpcdistill export (missing {', '.join(missing)})")
    kwargs = dict(blob["arch_kwargs"])
    if expect_arch is not None and kwargs.get("arch") != expect_arch:
        raise HpcdistillError(f"{path}: architecture {kwargs.get('arch')!r} does not match the expected {expect_arch!r}")
    if expect_classes is not None and kwargs.get("num_classes") != expect_classes:
        raise HpcdistillError(
            f"{path}: trained for {kwargs.get('num_classes')} classes, but the data has {expect_classes}"
        )
    arch = kwargs.pop("arch")
    num_classes = kwargs.pop("num_classes")
    model = build_model(arch, num_classes, **kwargs)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise HpcdistillError(f"{path}: weights do not fit {arch} with {num_classes} classes ({first})") from None
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
    )


def standardise(image: np.ndarray, stats: dict) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 1x3xHxW float32 through the loader's own Standardizer and finish_batch, so prediction
    preprocesses a tissue exactly as training and evaluation do."""
    planes = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()[None]
    colour_map = torch.from_numpy(Standardizer(stats).plain)[None]
    return finish_batch({"x": planes, "x_map": colour_map})["x"]


@torch.no_grad()
def predict_probabilities(exported: ExportedModel, image: np.ndarray) -> np.ndarray:
    """Class probabilities for one whole-tissue image at the model's magnification."""
    _, logits = exported.model(standardise(image, exported.stats).to(exported.device))
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
