"""Stopping on a non-finite loss or output without losing good work: inputs are checked first (a data problem
blames no checkpoint), then the complete checkpoints are tried newest first on the failing inputs and those that
fail too are set aside, so a rerun resumes from one that really is good. Collective: every rank stops together."""

from __future__ import annotations

from typing import Any

import torch

from hpcdistill.common.errors import TrainError
from hpcdistill.train.distributed import any_rank
from hpcdistill.train.state import Trainer


def stop_on_nonfinite(trainer: Trainer, inputs: list[dict[str, Any]], what: str) -> None:
    """A non-finite loss or output: stop, naming a checkpoint that really is good. Inputs that are themselves
    non-finite are a data problem (no checkpoint is blamed). Otherwise the complete checkpoints are tried newest
    first on the same inputs; those whose outputs are not finite either are set aside (`<tag>.diverged`), so a
    rerun with a corrected setting resumes from the good one with no manual step. Collective: every rank stops."""
    bad_input = next(
        (b["key"][0] for b in inputs if not all(torch.isfinite(b[s]).all() for s in ("x", "t") if s in b)), None
    )
    if any_rank(bad_input is not None, trainer.device):
        raise TrainError(
            f"{what}: non-finite input image{f' in sample {bad_input}' if bad_input else ' on another rank'}"
            " (check the manifest's mean/std and the shards); stopped, no checkpoint was set aside"
        )
    module, good, diverged = trainer.engine.module, None, []
    for candidate in reversed(trainer.folder.complete_checkpoints()):
        trainer.folder.load_module_weights(module, candidate)
        if not any_rank(not outputs_finite(trainer, inputs), trainer.device):
            good = candidate
            break
        diverged.append(candidate)
    moved = trainer.folder.set_aside(diverged, f"{what}; outputs of these weights are not finite on the same inputs")
    aside = f"; set aside as diverged: {', '.join(p.name for p in moved)}" if moved else ""
    start = f"resumes from {good}" if good else "starts from the beginning"
    raise TrainError(
        f"{what}; stopped. Last good checkpoint: {good or 'none'}{aside}. A rerun (e.g. with a lower train.lr) {start}"
    )


@torch.no_grad()
def outputs_finite(trainer: Trainer, inputs: list[dict[str, Any]]) -> bool:
    module = trainer.engine.module
    for batch in inputs:
        features, logits = module(batch["x"].to(trainer.device, trainer.dtype))
        if not (torch.isfinite(features).all() and torch.isfinite(logits).all()):
            return False
    return True


def check_finite(trainer: Trainer, loss: torch.Tensor, batches: list[dict[str, Any]]) -> None:
    """Stop every rank together (a rank leaving alone would hang the others in the next collective). Checked once
    per optimizer step: a non-finite step has already updated the weights in memory, but nothing is saved after it."""
    bad = (~torch.isfinite(loss)).float().reshape(1)  # on the device: NCCL reduces no CPU tensors
    if trainer.world > 1:
        torch.distributed.all_reduce(bad)
    if bad.item():
        stop_on_nonfinite(
            trainer,
            batches,
            f"step {trainer.state.global_step + 1} (epoch {trainer.state.epoch}): loss is {float(loss)} on "
            f"{int(bad.item())} rank(s)",
        )
