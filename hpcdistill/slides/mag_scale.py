"""What a magnification means for a slide's pixels, in one place. By default a magnification is a pixel size: 10x is
MPP_AT_10X microns per pixel (1.0, so 40x is 0.25 um/px and a "40x" scan at 0.2325 um/px is 43.01x), and every window
is cut at that physical scale, whatever objective power the scanner wrote. The objective basis is the behaviour
before (the objective power, else the pixel size snapped to a common power); it keeps older shard folders and models
reading as they were made."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hpcdistill.common.errors import SlideError

MPP_AT_10X = 1.0  # microns per pixel at 10x: the reference a physical magnification is measured against
MAG_BASES = ("mpp", "objective")  # a magnification from the slide's pixel size, or from its objective power
MPP_AT_10X_RANGE = (0.1, 10.0)  # what a reference pixel size can sensibly be


@dataclass(frozen=True)
class MagScale:
    """`basis` "mpp": a slide's base magnification is 10 * mpp_at_10x / its microns per pixel (the objective power
    only where it records no pixel size); "objective": the objective power, else the pixel size snapped to a
    common power (slides.metadata.mag_from_mpp)."""

    basis: str = "mpp"
    mpp_at_10x: float = MPP_AT_10X

    def __post_init__(self) -> None:
        if self.basis not in MAG_BASES:
            raise SlideError(f"magnification basis {self.basis!r}: must be one of {', '.join(MAG_BASES)}")
        low, high = MPP_AT_10X_RANGE
        if not (isinstance(self.mpp_at_10x, (int, float)) and math.isfinite(self.mpp_at_10x)):
            raise SlideError(f"mpp at 10x {self.mpp_at_10x!r}: must be a number of microns per pixel")
        if not low <= self.mpp_at_10x <= high:
            raise SlideError(f"mpp at 10x {self.mpp_at_10x:g}: must be {low:g} to {high:g} microns per pixel")
        object.__setattr__(self, "mpp_at_10x", float(self.mpp_at_10x))

    def physical_mag(self, mpp: float) -> float:
        """The magnification of a pixel `mpp` microns wide, to 5 significant digits (a TIFF resolution tag's
        rational is no more exact than that)."""
        return float(f"{10.0 * self.mpp_at_10x / mpp:.5g}")

    def to_dict(self) -> dict[str, Any]:
        return {"basis": self.basis, "mpp_at_10x": self.mpp_at_10x}

    @classmethod
    def from_dict(cls, record: Any, where: str) -> MagScale:
        """The scale a manifest or export recorded; one written before the option (None) is the objective basis."""
        if record is None:
            return OBJECTIVE_SCALE
        if not isinstance(record, dict) or set(record) != {"basis", "mpp_at_10x"}:
            raise SlideError(f"{where}: mag_scale {record!r}: expected {{basis, mpp_at_10x}}")
        return cls(str(record["basis"]), record["mpp_at_10x"])

    def describe(self) -> str:
        if self.basis == "objective":
            return "objective power"
        return f"pixel size (10x = {self.mpp_at_10x:g} um/px)"


PHYSICAL_SCALE = MagScale()
OBJECTIVE_SCALE = MagScale("objective")
