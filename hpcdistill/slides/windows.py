"""Tissue windows: the one way a slide's tissue becomes model inputs, shared by sharding and prediction.

Tissue boxes are found on a thumbnail; a box larger than `max_size` (10x px a side) is covered by equal, aligned
level-0 windows, and each window's size at every magnification is rounded through its 10x size. A model therefore
never sees, at prediction time, a tissue larger than any window it was trained on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable

import numpy as np

REF_MAG = 10.0  # --max-size and size rounding are expressed in 10x (teacher) pixels
DEFAULT_MAGS = (10.0, 5.0, 2.5, 1.25, 0.625)  # the sharder's defaults (shards.plan.ShardParams)
DEFAULT_MAX_SIZE = 8192
# Exports written before windowing was recorded were cut with the defaults unless --mags/--max-size said otherwise.
DEFAULT_WINDOWING = {"mags": list(DEFAULT_MAGS), "max_size": DEFAULT_MAX_SIZE}
Box = tuple[int, int, int, int]  # level-0 x, y, w, h


@dataclass(frozen=True)
class Windowing:
    """How tissues were cut into windows: the shard set's magnifications (they fix the alignment) and the largest
    window side in 10x px. Stored in every export, so prediction cuts exactly as the training shards were cut."""

    mags: tuple[float, ...]
    max_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"mags": [float(m) for m in self.mags], "max_size": int(self.max_size)}

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> Windowing:
        return Windowing(tuple(float(m) for m in raw["mags"]), int(raw["max_size"]))


def window_alignment(base_mag: float, mags: Iterable[float]) -> int:
    """Smallest level-0 step that maps to whole pixels at every mag (64 for 40x base down to 0.625x)."""
    step = 1
    for mag in mags:
        denominator = (
            Fraction(mag).limit_denominator(10_000) / Fraction(base_mag).limit_denominator(10_000)
        ).denominator
        step = step * denominator // math.gcd(step, denominator)
    return step if step <= 4096 else max(1, round(base_mag / min(mags)))


def split_windows(box: Box, slide_wh: tuple[int, int], base_mag: float, windowing: Windowing) -> list[Box]:
    """Level-0 windows covering a tissue box, each at most `windowing.max_size` 10x px a side.

    A box that fits is one window, itself. A larger one is covered by equal windows whose sides are multiples of
    the alignment step, so every window has whole-pixel sizes at all mags; the covered span is centred on the box.
    """
    x, y, w, h = box
    align = window_alignment(base_mag, windowing.mags)
    limit_l0 = max(align, int(windowing.max_size * base_mag / REF_MAG) // align * align)
    if w <= limit_l0 and h <= limit_l0:
        return [box]

    def axis(start: int, length: int, extent: int) -> list[tuple[int, int]]:
        count = math.ceil(length / limit_l0)
        step = math.ceil(length / count / align) * align
        span = count * step
        origin = min(max(0, start - (span - length) // 2), max(0, extent - span))
        return [
            (origin + i * step, min(step, extent - origin - i * step))
            for i in range(count)
            if origin + i * step < extent
        ]

    return [(wx, wy, ww, wh) for wy, wh in axis(y, h, slide_wh[1]) for wx, ww in axis(x, w, slide_wh[0])]


def window_sizes(window: Box, base_mag: float, mags: Iterable[float]) -> dict[float, tuple[int, int]]:
    """(w, h) of a level-0 window at each magnification, rounded through its 10x size."""
    from hpcdistill.slides.slide import target_size  # here, not at the top: training imports Windowing without pyvips

    return {mag: target_size((window[2], window[3]), base_mag, mag, ref_mag=REF_MAG) for mag in mags}


@dataclass
class TissueWindows:
    """A slide's thumbnail (for QC images and overlays), its tissue boxes and each box's windows."""

    thumb: np.ndarray
    scale: float  # level-0 px per thumbnail px
    boxes: list[Box]
    windows: list[list[Box]]  # windows[t]: the windows of tissue t
    labels: np.ndarray | None = None  # the thumbnail's labelled tissue mask (tissue.find_tissues)
    box_labels: list[int] | None = None  # box t's label in it
    small: int = 0  # tissues dropped by fitting_windows: no window as large as the network's smallest input
    classes: list[str | None] | None = None  # tissue t's class from the user's regions (slides.regions)
    threshold: float | None = None  # the tissue finder's threshold (tissue.Tissues), for finer outlines

    def mask(self, t: int | None = None) -> np.ndarray:
        """The tissue mask on the thumbnail: of tissue t, or of every tissue."""
        assert self.labels is not None and self.box_labels is not None
        return self.labels == self.box_labels[t] if t is not None else np.isin(self.labels, self.box_labels)

    @property
    def count(self) -> int:
        return sum(map(len, self.windows))

    @property
    def area(self) -> int:
        """Level-0 pixels of all windows: what cutting the slide costs (balances array tasks)."""
        return sum(w[2] * w[3] for windows in self.windows for w in windows)


def fitting_windows(found: TissueWindows, base_mag: float, mags: Iterable[float], min_side: int) -> TissueWindows:
    """The windows whose sides at every magnification in `mags` reach `min_side` px (the smallest input the network
    takes), and the tissues with any; `small` counts the tissues that went (none left). Sharding and prediction both
    drop through here, so a tissue too small for the model is neither cut nor classified."""
    mags = list(mags)
    fits = [
        [w for w in windows if min(min(size) for size in window_sizes(w, base_mag, mags).values()) >= min_side]
        for windows in found.windows
    ]
    if sum(map(len, fits)) == found.count:
        return found
    kept = keep_tissues(found, fits)
    return dataclasses.replace(kept, small=found.small + len(found.boxes) - len(kept.boxes))


def keep_tissues(found: TissueWindows, windows: list[list[Box]]) -> TissueWindows:
    """`found` with tissue t's windows replaced by windows[t]; a tissue left with none goes (box, label, class)."""
    kept = [t for t, ws in enumerate(windows) if ws]
    return dataclasses.replace(
        found,
        boxes=[found.boxes[t] for t in kept],
        windows=[windows[t] for t in kept],
        box_labels=[found.box_labels[t] for t in kept] if found.box_labels is not None else None,
        classes=[found.classes[t] for t in kept] if found.classes is not None else None,
    )


def find_windows(
    slide: Any, tissue_params: Any, windowing: Windowing, regions: Any = None, roi_mode: str = "inside"
) -> TissueWindows:
    """Tissue boxes on the slide's thumbnail (tissue.TissueParams), each cut into windows. With `regions`
    (slides.regions.Regions), tissue is kept only inside them ("inside") or outside them ("outside"), and a window
    with none of its tissue left (inside a hole, under an excluded region) is dropped."""
    from hpcdistill.slides import tissue

    info = slide.info
    thumb, scale = slide.thumbnail(tissue_params.thumb_size)
    keep = None
    if regions is not None and roi_mode != "ignore":
        regions.check_on_slide(info.width, info.height)
        inside = regions.mask(thumb.shape[:2], scale)
        keep = inside if roi_mode == "inside" else ~inside
    boxes, labels, box_labels, threshold = tissue.find_tissues(
        thumb, scale, tissue_params, (info.width, info.height), keep
    )
    windows = [split_windows(box, (info.width, info.height), info.base_mag, windowing) for box in boxes]
    found = TissueWindows(thumb, scale, boxes, windows, labels, box_labels, threshold=threshold)
    if keep is None:
        return found
    return keep_tissues(found, [[w for w in ws if _holds(labels, t, w, scale)] for ws, t in zip(windows, box_labels)])


def _holds(labels: np.ndarray, label: int, window: Box, scale: float) -> bool:
    """Whether any thumbnail pixel of tissue `label` lies in the level-0 window."""
    x, y, w, h = window
    rows = slice(int(y // scale), max(int(y // scale) + 1, math.ceil((y + h) / scale)))
    cols = slice(int(x // scale), max(int(x // scale) + 1, math.ceil((x + w) / scale)))
    return bool((labels[rows, cols] == label).any())
