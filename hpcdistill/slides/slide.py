"""The slide interface: an open whole-slide image that reads regions at a target magnification.

A backend (backends.py, chosen by factory.py) only decodes a thumbnail and level-0 pixels; what every slide shares
is written once here: checking a request, clipping the box to the slide,
white outside it, and Lanczos3 from level 0 for every magnification (resample.py), so backends agree.
"""

from __future__ import annotations

import abc
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np
import pyvips

from hpcdistill.common.errors import SlideError, one_line
from hpcdistill.common.signals import check_interrupted
from hpcdistill.slides.resample import resample_together


@dataclass(frozen=True)
class SlideInfo:
    path: str
    width: int  # level 0
    height: int  # level 0
    base_mag: float
    mpp: float | None  # microns per level-0 pixel (x)
    mag_source: str  # "objective-power" | "mpp" | "override"
    vendor: str
    level_count: int
    notes: tuple[str, ...] = ()  # metadata that disagrees with itself, said when the slide is opened


def target_size(box_wh: tuple[int, int], base_mag: float, mag: float, ref_mag: float = 10.0) -> tuple[int, int]:
    """Output size of a level-0 box at `mag`, rounded via the `ref_mag` size so every low-mag crop is the
    ref-mag crop divided by the magnification ratio, within 1 px."""
    if not (base_mag > 0 and mag > 0 and ref_mag > 0):
        raise SlideError(f"magnification: base {base_mag}, target {mag} and reference {ref_mag} must be positive")
    ratio = ref_mag / mag
    sizes = []
    for length in box_wh:
        at_ref = round(length * ref_mag / base_mag)
        sizes.append(max(1, round(at_ref / ratio)))
    return sizes[0], sizes[1]


READ_SOURCES = ("level0", "pyramid")  # where crops come from: level 0 always, or the level that fits each mag


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size and how many level-0 px one of its px spans (x, y)."""

    index: int
    width: int
    height: int
    scale_x: float
    scale_y: float

    def magnification(self, base_mag: float) -> float:
        return base_mag / self.scale_x


class Slide(abc.ABC):
    """An open slide. Use as a context manager or call close()."""

    backend: ClassVar[str]  # "vips" | "openslide"
    read_errors: ClassVar[tuple[type[BaseException], ...]]  # what the backend raises on unreadable pixels

    def __init__(self, info: SlideInfo):
        self.info = info
        self.decoded_pixels: Counter[int] = Counter()  # level index -> pixels read by crops (benches and tests)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file handles and decoded images."""

    @abc.abstractmethod
    def _read_thumbnail(self, max_size: int) -> np.ndarray:
        """RGB uint8 image of the whole slide, long side at most `max_size`."""

    @abc.abstractmethod
    def levels(self) -> list[Level]:
        """The pyramid levels, level 0 first."""

    @abc.abstractmethod
    def _read_level(self, level: Level, box: tuple[int, int, int, int]) -> AbstractContextManager[pyvips.Image]:
        """Pixels of a box (in the level's own px) inside the level, as a lazy 3-band uchar image valid inside the
        context; only the tiles the box touches are decoded."""

    def level_for(self, mag: float) -> Level:
        """The smallest level whose magnification is at or above `mag` (level 0 always is)."""
        base = self.info.base_mag
        fitting = [lv for lv in self.levels() if lv.magnification(base) >= mag * (1 - 1e-6)]
        return max(fitting, key=lambda lv: lv.scale_x) if fitting else self.levels()[0]

    def _fail(self, what: str, err: BaseException) -> SlideError:
        check_interrupted()  # a read stopped by a signal (libvips killed it) ends the command, not the slide
        return SlideError(f"{self.info.path}: {what}: {one_line(err)}")

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """RGB thumbnail whose long side is at most `max_size`, and level-0 px per thumbnail px."""
        if max_size < 1:
            raise SlideError(f"{self.info.path}: thumbnail size must be >= 1, got {max_size}")
        try:
            thumb = self._read_thumbnail(max_size)
        except self.read_errors as err:
            raise self._fail("cannot read thumbnail", err) from None
        return np.ascontiguousarray(thumb, dtype=np.uint8), self.info.width / thumb.shape[1]

    def read_at_mag(
        self, box_l0: tuple[int, int, int, int], mag: float, size: tuple[int, int], source: str = "level0"
    ) -> np.ndarray:
        """The level-0 box (x, y, w, h) Lanczos3-resampled to `size` (w, h) -> (h, w, 3) uint8 RGB.

        `mag` is checked against the base magnification; the resampling factor comes from box and size (see
        target_size). Parts of the box outside the slide read as white. `source`: see read_at_mags.
        """
        return self.read_at_mags(box_l0, {mag: size}, source)[mag]

    def read_at_mags(
        self, box_l0: tuple[int, int, int, int], sizes: Mapping[float, tuple[int, int]], source: str = "level0"
    ) -> dict[float, np.ndarray]:
        """The level-0 box at several magnifications {mag: (w, h)} -> {mag: (h, w, 3) uint8 RGB}.

        source="level0" (the paper): every mag is Lanczos3-resampled directly from level-0 pixels, decoded once for
        all of them (never from another mag's output), identical to read_at_mag(box_l0, mag, size).
        source="pyramid": each mag is resampled, the same way, from the smallest pyramid level at or above it
        (`level_for`); the box maps to that level's px to the nearest px. See resample_together for how the work
        is shared.
        """
        wanted = self._checked_request(box_l0, sizes)
        if source not in READ_SOURCES:
            raise SlideError(f"{self.info.path}: read source {source!r}: expected one of {', '.join(READ_SOURCES)}")
        groups: dict[Level, dict[float, tuple[int, int]]] = {}
        for mag, size in wanted.items():
            level = self.level_for(mag) if source == "pyramid" else self.levels()[0]
            groups.setdefault(level, {})[mag] = size
        out: dict[float, np.ndarray] = {}
        for level, group in groups.items():
            out.update(self._read_from_level(level, box_l0, group))
        return out

    def _read_from_level(
        self, level: Level, box_l0: tuple[int, int, int, int], wanted: dict[float, tuple[int, int]]
    ) -> dict[float, np.ndarray]:
        x, y, w, h = (int(v) for v in box_l0)
        box = (x, y, w, h)
        if level.index:
            box = (round(x / level.scale_x), round(y / level.scale_y))
            box += (max(1, round(w / level.scale_x)), max(1, round(h / level.scale_y)))
        inner, placement = self._clip(box, level, box_l0)
        try:
            with self._read_level(level, inner) as crop:
                self.decoded_pixels[level.index] += inner[2] * inner[3]
                left, top, pw, ph = placement
                if (left, top, pw, ph) != (0, 0, crop.width, crop.height):
                    crop = crop.embed(left, top, pw, ph, extend="white")
                return resample_together(crop, wanted)
        except self.read_errors as err:
            raise self._fail(f"cannot read box {tuple(box_l0)}", err) from None

    def _checked_request(
        self, box_l0: tuple[int, int, int, int], sizes: Mapping[float, tuple[int, int]]
    ) -> dict[float, tuple[int, int]]:
        """{mag: (w, h)} as ints; SlideError for an empty box or size, or a mag above the base magnification."""
        path = self.info.path
        _, _, w, h = (int(v) for v in box_l0)
        wanted = {mag: (int(size[0]), int(size[1])) for mag, size in sizes.items()}
        if w < 1 or h < 1 or not wanted or any(ow < 1 or oh < 1 for ow, oh in wanted.values()):
            raise SlideError(f"{path}: empty box {tuple(box_l0)} or sizes {dict(sizes)}")
        for mag in wanted:
            if mag > self.info.base_mag * (1 + 1e-9):
                raise SlideError(
                    f"{path}: magnification {mag:g}x exceeds the base magnification {self.info.base_mag:g}x"
                )
        return wanted

    def _clip(
        self, box: tuple[int, int, int, int], level: Level, box_l0: tuple[int, int, int, int]
    ) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        """(the part of the box (level px) inside the level, (left, top, w, h) placing that part in the box)."""
        x, y, w, h = box
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, level.width), min(y + h, level.height)
        if x1 <= x0 or y1 <= y0:
            raise SlideError(
                f"{self.info.path}: box {tuple(box_l0)} lies outside the {self.info.width}x{self.info.height} slide"
            )
        return (x0, y0, x1 - x0, y1 - y0), (x0 - x, y0 - y, w, h)
