"""Inference with an exported model (read by `run_folder.load_exported`): the device to run on, and tissue
images standardised exactly as in training."""

from __future__ import annotations

import numpy as np
import torch

from hpcdistill.data import Standardizer, finish_batch
from hpcdistill.errors import HpcdistillError
from hpcdistill.run_folder import ExportedModel


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


def standardise(image: np.ndarray, stats: dict) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 1x3xHxW float32 through the loader's own Standardizer and finish_batch, so prediction
    preprocesses a tissue exactly as training and evaluation do."""
    planes = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()[None]
    colour_map = torch.from_numpy(Standardizer(stats).plain)[None]
    return finish_batch({"x": planes, "x_map": colour_map})["x"]


class NonFiniteOutputError(HpcdistillError):
    """The model's outputs are NaN or infinite: a diverged or corrupted export, never a result."""


def require_finite(logits: torch.Tensor, checkpoint: str, tissue: str) -> None:
    """NaN or infinite logits have no meaningful argmax (it would invent a class): refuse the model instead."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutputError(f"{checkpoint}: the model's outputs are not finite on {tissue}; refusing to "
                                   "score or classify with it (a diverged or corrupted export: retrain it, or use "
                                   "the export of an earlier run)")


@torch.no_grad()
def predict_probabilities(exported: ExportedModel, image: np.ndarray, tissue: str) -> np.ndarray:
    """Class probabilities for one whole-tissue image at the model's magnification; `tissue` names it in errors."""
    _, logits = exported.model(standardise(image, exported.stats).to(exported.device))
    require_finite(logits, exported.path, tissue)
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
