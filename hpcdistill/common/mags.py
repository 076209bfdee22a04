"""Magnification names, shared by shards, configs and reports ("10x", "2.5x", "0.625x")."""

from __future__ import annotations

from hpcdistill.common.errors import HpcdistillError


def mag_name(mag: float) -> str:
    """10.0 -> '10x', 2.5 -> '2.5x', 0.625 -> '0.625x' (shortest exact decimal form)."""
    return f"{float(mag):g}x"


def parse_mag(text: str | float) -> float:
    """'2.5x', '2.5' or 2.5 -> 2.5; rejects non-positive or non-numeric values."""
    raw = str(text).strip().lower().removesuffix("x")
    try:
        mag = float(raw)
    except ValueError:
        raise HpcdistillError(f"magnification {text!r}: not a number like '2.5' or '2.5x'") from None
    if not mag > 0:
        raise HpcdistillError(f"magnification {text!r}: must be positive")
    return mag
