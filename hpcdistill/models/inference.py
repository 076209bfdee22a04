"""Running a model over tissues: the device to run on, tissue images standardised exactly as in training, and the
one loop that feeds a stream of tissues to a model, shared by validation, evaluation and prediction (each sample's
out-of-GPU-memory error names it; non-finite outputs are never turned into a class)."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch

from hpcdistill.common.errors import ModelError, NonFiniteOutputError
from hpcdistill.common.mags import mag_name
from hpcdistill.data.augment import Standardizer
from hpcdistill.data.device_batch import finish_batch


def pick_device(name: str = "auto") -> torch.device:
    """ "auto": the first GPU if there is one, else the CPU; or an explicit "cpu", "cuda", "cuda:N"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"--device {name!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ModelError(f"--device {name!r}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise ModelError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def standardise(image: np.ndarray, stats: dict) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 1x3xHxW float32 through the loader's own Standardizer and finish_batch, so prediction
    preprocesses a tissue exactly as training and evaluation do."""
    colour_map = torch.from_numpy(Standardizer(stats).plain)[None]
    batch = {
        "key": ["image"],
        "slide": ["image"],
        "y": torch.tensor([-1]),
        "x_map": colour_map,
        "x": [torch.from_numpy(np.ascontiguousarray(image))],
    }
    return finish_batch(batch)["x"]


def require_finite(logits: torch.Tensor, checkpoint: str, tissue: str) -> None:
    """NaN or infinite logits have no meaningful argmax (it would invent a class): refuse the model instead."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutputError(
            f"{checkpoint}: the model's outputs are not finite on {tissue}; refusing to "
            "score or classify with it (a diverged or corrupted export: retrain it, or use "
            "the export of an earlier run)"
        )


def model_outputs(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    mag: float,
    remedy: str,
) -> Iterator[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]:
    """(batch, features, logits) for each batch, its images standardised on `device` in `dtype`, without gradients.
    A sample that does not fit in GPU memory stops the loop with one line naming it, its size at `mag` and `remedy`
    (whole tissues vary in size, so which one matters). Eval/train mode is the caller's."""
    for batch in batches:
        batch = finish_batch(batch, device, dtype)
        batch["x"] = batch["x"].to(device, dtype)
        try:
            with torch.no_grad():
                features, logits = model(batch["x"])
        except torch.cuda.OutOfMemoryError:
            height, width = batch["x"].shape[-2:]
            raise ModelError(
                f"{batch['key'][0]} ({width}x{height} px at {mag_name(mag)}): does not fit in GPU memory; {remedy}"
            ) from None
        yield batch, features, logits


@torch.no_grad()
def smallest_input(model: torch.nn.Module, device: torch.device, limit: int = 256) -> int:
    """The smallest square side, in pixels, the model takes: found by running it, not assumed, since it depends on
    the stem's stride and on GroupNorm (a group of one channel over a 1x1 map has nothing to normalise)."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    try:
        for side in range(1, limit + 1):
            try:
                model(torch.zeros(1, 3, side, side, device=device, dtype=dtype))
                return side
            except torch.cuda.OutOfMemoryError:
                raise
            except (RuntimeError, ValueError):  # too small: a map shrunk to nothing, a GroupNorm group of one value
                continue
        raise ModelError(f"the model takes no input up to {limit} px square")
    finally:
        model.train(was_training)
