"""Forward-pass FLOPs (paper §4.4): counted on a meta-device copy of the model, per magnification at a fixed field
of view and at a manifest's median and mean tissue size."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from hpcdistill.common.errors import ScoringError
from hpcdistill.common.mags import mag_name

FIXED_SIZE_10X = 512  # px at 10x for the fixed-size GFLOPs column; scaled by mag/10 at lower magnifications


def forward_flops(model: torch.nn.Module, input_size: tuple[int, int], in_chans: int = 3) -> int:
    """FLOPs (1 multiply-add = 2 FLOPs) of one forward pass on a (1, in_chans, h, w) input.

    Counted by torch.utils.flop_counter on a meta-device copy (shapes only: no compute, no memory, so
    whole-tissue sizes are instant). The counter covers convolutions and matrix products -- the same
    scope as the fvcore/thop conventions. GroupNorm, ReLU, pooling and residual adds are not counted:
    at ~8 FLOPs per normalised element they would add ~0.5% for ResNet-18 at width 64 (more for very
    narrow models). torchvision's "1.814 GFLOPS" for ResNet-18 at 224^2 is multiply-adds; this returns
    3,628,146,688 FLOPs for build_model("resnet18", 1000) at 224x224, exactly twice that.
    """
    h, w = (int(v) for v in input_size)
    if h < 1 or w < 1:
        raise ScoringError(f"input_size: must be positive (h, w), got {input_size!r}")
    meta = copy.deepcopy(model).to("meta")
    meta.eval()
    x = torch.zeros(1, in_chans, h, w, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta(x)
    return int(counter.get_total_flops())


def gflops(flops: int | float) -> float:
    """FLOPs -> GFLOPs (billions of floating-point operations)."""
    return flops / 1e9


def gmacs(flops: int | float) -> float:
    """FLOPs -> GMACs (billions of multiply-adds; the unit torchvision and thop call 'GFLOPS')."""
    return flops / 2e9


def flops_at_sizes(model: torch.nn.Module, manifest: dict[str, Any] | None, mag: float) -> dict[str, Any]:
    """GFLOPs (FLOPs, 2 per multiply-add) per forward pass at a fixed size and at the manifest's median/mean tissue."""
    side = max(1, round(FIXED_SIZE_10X * mag / 10))
    out: dict[str, Any] = {
        "unit": "GFLOPs (2 FLOPs per multiply-add)",
        "fixed_size": [side, side],
        "fixed": gflops(forward_flops(model, (side, side))),
    }
    sizes = (manifest or {}).get("sizes", {}).get(mag_name(mag), {})
    for stat in ("median", "mean"):
        if stat in sizes:
            w, h = (max(1, round(float(v))) for v in sizes[stat])
            out[f"{stat}_size"] = [w, h]
            out[stat] = gflops(forward_flops(model, (h, w)))
    out.setdefault("median", out["fixed"])
    out.setdefault("mean", out["fixed"])
    return out


def flops_per_mag(
    model: torch.nn.Module, mags: list[float], manifest: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """`hpcdistill flops`: GFLOPs per magnification at a fixed field of view and at the manifest's tissue sizes.

    The fixed column keeps the physical field of view constant (FIXED_SIZE_10X px at 10x), so it shows the
    ~4^k saving of each halving of the magnification independently of the data.
    """
    return [{"mag": mag, **flops_at_sizes(model, manifest, mag)} for mag in mags]
