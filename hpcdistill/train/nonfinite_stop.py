"""Stopping on a non-finite loss or output without losing good work: inputs are checked first (a data problem
blames no checkpoint), then the complete checkpoints are tried newest first on the failing inputs and those that
fail too are set aside, so a rerun resumes from one that really is good. Collective: every rank stops together."""

from __future__ import annotations

from typing import Any

import torch

from hpcdistill.common.errors import TrainError
from hpcdistill.train.distributed import any_rank
from hpcdistill.train.state import State


def stop_on_nonfinite(state: State, inputs: list[dict[str, Any]], what: str) -> None:
    """A non-finite loss or output: stop, naming a checkpoint that really is good. Inputs that are themselves
    non-finite are a data problem (no checkpoint is blamed). Otherwise the complete checkpoints are tried newest
    first on the same inputs; those whose outputs are not finite either are set aside (`<tag>.diverged`), so a
    rerun with a corrected setting resumes from the good one with no manual step. Collective: every rank stops."""
    bad_input = next(
        (b["key"][0] for b in inputs if not all(torch.isfinite(b[s]).all() for s in ("x", "t") if s in b)), None
    )
    if any_rank(bad_input is not None, state.device):
        raise TrainError(
            f"{what}: non-finite input image{f' in sample {bad_input}' if bad_input else ' on another rank'}"
            " (check the manifest's mean/std and the shards); stopped, no checkpoint was set aside"
        )
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
    raise TrainError(
        f"{what}; stopped. Last good checkpoint: {good or 'none'}{aside}. A rerun (e.g. with a lower train.lr) {start}"
    )


@torch.no_grad()
def outputs_finite(state: State, inputs: list[dict[str, Any]]) -> bool:
    module = state.engine.module
    for batch in inputs:
        features, logits = module(batch["x"].to(state.device, state.dtype))
        if not (torch.isfinite(features).all() and torch.isfinite(logits).all()):
            return False
    return True


def check_finite(state: State, loss: torch.Tensor, batches: list[dict[str, Any]]) -> None:
    """Stop every rank together (a rank leaving alone would hang the others in the next collective). Checked once
    per optimizer step: a non-finite step has already updated the weights in memory, but nothing is saved after it."""
    bad = (~torch.isfinite(loss)).float().reshape(1)  # on the device: NCCL reduces no CPU tensors
    if state.world > 1:
        torch.distributed.all_reduce(bad)
    if bad.item():
        stop_on_nonfinite(
            state,
            batches,
            f"step {state.global_step + 1} (epoch {state.epoch}): loss is {float(loss)} on {int(bad.item())} rank(s)",
        )
