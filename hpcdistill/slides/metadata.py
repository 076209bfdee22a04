"""What a slide file says about itself: base magnification and mpp (OpenSlide properties, the Aperio description,
TIFF resolution tags) and the TIFF pyramid levels libvips can read.

Backend-independent, so a slide's info is the same whichever backend reads its pixels.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import tifffile

from hpcdistill.common.errors import SlideError
from hpcdistill.common.limits import MPP_RANGE, OBJECTIVE_RANGE, limit, raise_hint
from hpcdistill.slides.mag_scale import PHYSICAL_SCALE, MagScale

# Objective powers scanners actually use; an mpp-derived magnification within SNAP_TOLERANCE snaps to one.
COMMON_POWERS = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 63.0, 80.0, 100.0)
SNAP_TOLERANCE = 0.15


def mag_from_mpp(mpp: float) -> float:
    """Magnification implied by microns per pixel (10x ~ 1 um/px); snapped to a common objective power."""
    raw = 10.0 / mpp
    nearest = min(COMMON_POWERS, key=lambda power: abs(math.log(raw / power)))
    if abs(raw / nearest - 1.0) <= SNAP_TOLERANCE:
        return nearest
    return float(f"{raw:.3g}")


def _positive_float(text: Any) -> float | None:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


def _aperio_field(description: str, key: str) -> float | None:
    match = re.search(r"\|\s*" + re.escape(key) + r"\s*=\s*([^|\r\n]+)", description)
    return _positive_float(match.group(1)) if match else None


def _mpp_from_resolution(page: tifffile.TiffPage) -> float | None:
    """Microns per pixel from XResolution/ResolutionUnit; None when the unit is 'none' or the tags are absent."""
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    numerator, denominator = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value)
    if not numerator or not denominator or unit not in (2, 3):
        return None
    px_per_unit = numerator / denominator
    microns_per_unit = 25400.0 if unit == 2 else 10000.0
    return microns_per_unit / px_per_unit


def base_magnification(
    path: str,
    props: Mapping[str, str],
    description: str,
    res_mpp: float | None,
    base_mag: float | None,
    scale: MagScale = PHYSICAL_SCALE,
) -> tuple[float, str, float | None]:
    """(base magnification, its source, mpp): `base_mag` if given; else, on the default pixel-size scale, from the
    mpp (OpenSlide, Aperio MPP, TIFF resolution tags; slides.mag_scale), else the objective power (OpenSlide,
    Aperio AppMag); on the objective scale, the objective power first, then the mpp snapped to a common power.
    The source names which: "mpp", "objective-power" or "override". SlideError if none is known."""
    mpp = _positive_float(props.get("openslide.mpp-x")) or _aperio_field(description, "MPP") or res_mpp
    objective = _positive_float(props.get("openslide.objective-power")) or _aperio_field(description, "AppMag")
    if base_mag is not None:
        return float(base_mag), "override", mpp if mpp is None or _within(mpp, MPP_RANGE) else None
    for value, (low, high), what in ((objective, OBJECTIVE_RANGE, "x objective power"), (mpp, MPP_RANGE, " um/px")):
        if value is not None and not _within(value, (low, high)):
            raise SlideError(
                f"{path}: implausible metadata: {value:.6g}{what} (a scanner writes {low:g} to {high:g}); a corrupt "
                "header: pass --base-mag with the scan's magnification"
            )
    if mpp is not None and scale.basis == "mpp":
        return scale.physical_mag(mpp), "mpp", mpp
    if objective is not None:
        return objective, "objective-power", mpp
    if mpp is not None:
        return mag_from_mpp(mpp), "mpp", mpp
    raise SlideError(f"{path}: no magnification metadata (objective power or mpp); pass --base-mag")


def check_level_sizes(path: str, sizes: list[tuple[int, int]]) -> None:
    """Refuse, before a pixel is decoded, a slide whose declared levels no scanner writes: a level 0 past the
    `level0_pixels` limit, levels that grow, or no level small enough to find tissue on in bounded time."""
    (width, height), smallest = sizes[0], min(w * h for w, h in sizes)
    hint = "a corrupt header or a decompression bomb"
    if width < 1 or height < 1 or width * height > limit("level0_pixels"):
        raise SlideError(
            f"{path}: implausible slide: level 0 declares {width}x{height} px ({hint}; {raise_hint('level0_pixels')})"
        )
    for index, ((w0, h0), (w1, h1)) in enumerate(zip(sizes, sizes[1:]), start=1):
        if not (0 < w1 <= w0 and 0 < h1 <= h0):
            raise SlideError(f"{path}: implausible slide: level {index} ({w1}x{h1}) is not smaller than the last")
    if smallest > limit("thumbnail_source_pixels"):
        raise SlideError(
            f"{path}: no pyramid level small enough to find tissue on (the smallest holds {smallest:,} px; "
            f"{raise_hint('thumbnail_source_pixels')}; or add a pyramid, e.g. with vips tiffsave --pyramid)"
        )


def metadata_conflicts(
    props: Mapping[str, str], description: str, res_mpp: float | None, level0: tuple[int, int], used: tuple[float, str]
) -> list[str]:
    """One line per disagreement between the objective power, the microns per pixel and the level-0 size (a
    re-exported slide that kept a stale Aperio header), naming the values and the magnification used."""
    mpp = _positive_float(props.get("openslide.mpp-x")) or _aperio_field(description, "MPP") or res_mpp
    objective = _positive_float(props.get("openslide.objective-power")) or _aperio_field(description, "AppMag")
    mag, source = used
    notes = []
    if objective is not None and mpp is not None and abs(math.log(objective * mpp / 10.0)) > math.log(1.5):
        notes.append(
            f"objective power {objective:g}x and {mpp:g} um/px ({10.0 / mpp:.3g}x) disagree; using {mag:g}x ({source})"
        )
    stated = re.search(r"^\s*(\d+)x(\d+)\s*\[", description.split("\n", 1)[-1]) if "\n" in description else None
    if stated and (int(stated.group(1)), int(stated.group(2))) != level0:
        notes.append(
            f"the Aperio header describes a {stated.group(1)}x{stated.group(2)} image but level 0 is "
            f"{level0[0]}x{level0[1]} (a re-exported slide?); its magnification fields may be stale; using "
            f"{mag:g}x ({source}), --base-mag overrides"
        )
    return notes


@dataclass(frozen=True)
class TiffLevel:
    width: int
    height: int
    page: int
    subifd: int  # -1: the page itself; k >= 0: that page's k-th SubIFD


@dataclass(frozen=True)
class TiffProbe:
    """What tifffile read from a file; `error`: why it could not read (all of) it."""

    description: str  # of page 0 ("" if unread)
    res_mpp: float | None  # from page 0's resolution tags
    levels: list[TiffLevel] | None  # pyramid levels, largest first; None when not asked for or unread
    error: BaseException | None


def probe_tiff(path: str, with_levels: bool) -> TiffProbe:
    """Page 0's description and resolution mpp, and (`with_levels`) the pyramid levels; never raises for a file
    that is not a readable TIFF (see `error`), only SlideError for a truncated one."""
    description, res_mpp, levels = "", None, None
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            page0 = tif.pages[0]
            description = page0.description or ""
            res_mpp = _mpp_from_resolution(page0)
            if with_levels:
                levels = _tiff_levels(path, tif)
    except SlideError:
        raise
    except Exception as err:  # tifffile raises many types on corrupt input; all mean "not a readable TIFF"
        return TiffProbe(description, res_mpp, levels, err)
    return TiffProbe(description, res_mpp, levels, None)


def _is_level_of(page: tifffile.TiffPage, width0: int, height0: int) -> bool:
    """A smaller copy of the whole level-0 image: same aspect ratio (within rounding of the downsample)."""
    width, height = int(page.imagewidth), int(page.imagelength)
    if not (width < width0 and height < height0):
        return False
    return abs(height - height0 * width / width0) <= max(2.0, 0.01 * height)


def _tiff_levels(path: str, tif: tifffile.TiffFile) -> list[TiffLevel]:
    """Pyramid levels (SubIFDs, or tiled pages that are whole-slide downsamples), largest first; checks every
    level's data lies inside the file.

    Pages are scanned directly: tifffile's series stop at the first page flagged 'reduced' (SVS) or miss
    SubIFD pyramids with /16 steps. Stripped pages (Aperio thumbnail, label, macro) are not levels,
    as in OpenSlide.
    """
    page0 = tif.pages[0]
    width0, height0 = int(page0.imagewidth), int(page0.imagelength)
    file_size = tif.filehandle.size
    found: list[tuple[TiffLevel, tifffile.TiffPage]] = [(TiffLevel(width0, height0, 0, -1), page0)]
    if page0.subifds:
        for k, sub in enumerate(page0.pages):
            found.append((TiffLevel(int(sub.imagewidth), int(sub.imagelength), 0, k), sub))
    else:
        for page in tif.pages[1:]:
            if page.is_tiled and _is_level_of(page, width0, height0):
                found.append((TiffLevel(int(page.imagewidth), int(page.imagelength), int(page.index), -1), page))
    for index, (_, page) in enumerate(found):
        ends = [off + count for off, count in zip(page.dataoffsets, page.databytecounts) if count]
        if ends and max(ends) > file_size:
            raise SlideError(f"{path}: truncated file (level {index} image data ends past the end of the file)")
        declared = sum(page.databytecounts)
        if declared > file_size:  # tiles that share their bytes: a decompression bomb, never a scanner's file
            raise SlideError(
                f"{path}: implausible slide: level {index} declares {declared:,} bytes of tiles in a "
                f"{file_size:,}-byte file (its tiles share data)"
            )
    return [level for level, _ in sorted(found, key=lambda item: -item[0].width)]


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


_TIFFFILE_QUIET = _DropAll()


@contextlib.contextmanager
def _quiet_tifffile():
    """Mute tifffile's logger while probing a file: on a truncated/corrupt file it logs lines such as
    'invalid page offset' to stderr, and the one-line SlideError raised here already says what is wrong."""
    logger = logging.getLogger("tifffile")
    logger.addFilter(_TIFFFILE_QUIET)
    try:
        yield
    finally:
        logger.removeFilter(_TIFFFILE_QUIET)
