"""Open a whole-slide image, find its base magnification, and read regions at a target magnification.

Every low-magnification image is Lanczos3-resampled directly from level-0 pixels (the paper: "every downsampling
was obtained directly from the original image"), never from a pyramid level, so no composition of resamplings.

Pixels come from libvips `tiffload` (SVS and pyramidal TIFF; demand-driven, so memory stays bounded for any box
size). Formats tiffload cannot read reliably (NDPI, MRXS, Ventana, ...) are read with OpenSlide into a
memory-mapped scratch file and then resampled by the same vips code, so both paths give the same pixels.

Several magnifications of one box (read_at_mags) share one decode: the box is cut into pieces of at most
FETCH_WINDOW px, each piece plus the widest filter's support is decoded into memory once, and every
magnification is resampled from it by the same whole-box pipeline (bit-identical to resampling each
magnification from the whole box; memory bounded by the piece size, never by the slide size). Measured on the
tissue of a synthetic 16000x12000 40x slide, mags 10..0.625, one vips thread: 58 level-0 Mpix per CPU second,
1.8x bare vips crop + reduce per mag, 3.0x OpenSlide read_region (once) + PIL LANCZOS; peak RSS 0.33 GiB even
for the whole slide as one box.

Precision path, measured (libvips 8.18, one thread, 4096x4096 level-0 crop of a synthetic 40x H&E slide, one run
on a shared 2-core machine so compare within a row; difference to PIL LANCZOS on the same pixels as
bias / mean abs / p99 abs, in grey levels):

    shrink   vips 8-bit reduce          all-float reduce            chosen: 8-bit pass 1 + float pass 2
      4      38 ms  -0.85 / 0.85 / 2     772 ms  +0.01 / 0.08 / 1    112 ms  -0.01 / 0.17 / 1
      8      47 ms  -0.80 / 0.80 / 1    1446 ms  +0.01 / 0.04 / 1     71 ms  -0.03 / 0.08 / 1
     16      47 ms  -1.74 / 1.74 / 2    1131 ms  -0.00 / 0.03 / 1     47 ms  +0.00 / 0.04 / 1
     64      73 ms  -7.49 / 7.49 / 9    1394 ms  -0.01 / 0.02 / 1     38 ms  -0.01 / 0.08 / 1
     62.5    71 ms  -5.50 / 5.50 / 6    1119 ms  -0.00 / 0.03 / 1     31 ms  +0.01 / 0.07 / 1

vips' 8-bit darkening is not rounding: its integer Lanczos masks sum to less than 1 (per pass 0.998 at 4x,
0.997 at 16x, 0.983 at 64x), a pure gain. Dividing it out of an 8-bit result cannot work (the output was
already rounded, so small corrections round back to the same value); so the full-resolution first pass
(reducev) stays 8-bit, its gain is measured once per (length, shrink) on a constant column, and the second
pass, over shrink-times fewer pixels, runs in float with the gain divided out before the one final rounding.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import openslide
import pyvips
import tifffile

from hpcdistill.errors import HpcdistillError

# Bounded vips operation cache: slides are streamed, so a large cache only holds memory for nothing.
pyvips.cache_set_max_mem(256 * 1024 * 1024)
pyvips.cache_set_max(100)
pyvips.cache_set_max_files(20)

# Objective powers scanners actually use; an mpp-derived magnification within SNAP_TOLERANCE snaps to one.
COMMON_POWERS = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 63.0, 80.0, 100.0)
SNAP_TOLERANCE = 0.15
# vips `reduce` builds a kernel of ~6*shrink taps and refuses large shrinks; beyond this a box pre-shrink is used.
MAX_LANCZOS_SHRINK = 256.0
# TIFF-based vendors whose level 0 libvips tiffload reads as a plain page 0.
VIPS_VENDORS = {None, "aperio", "generic-tiff"}
# Undo the gain of vips' fixed-point Lanczos masks (see lanczos_to_size); False: raw vips 8-bit output.
PRECISE_RESAMPLE = True
# Tile (w, h) of the cache between the vertical and horizontal Lanczos passes (5 rows of them are kept).
PASS_CACHE_TILE = (512, 32)
# ushort level of the constant line the per-pixel filter gain is measured on (read to ~1e-5).
GAIN_PROBE = 32768
# Largest level-0 piece side (px) read_at_mags decodes into memory at once (plus filter margins): bounds memory.
FETCH_WINDOW = 4096
# Block edge (level-0 px) for OpenSlide reads in the fallback path.
OPENSLIDE_BLOCK = 2048


class SlideError(HpcdistillError):
    """A slide cannot be opened or read; the message is '<path>: <reason>' on one line."""


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


def one_line(err: BaseException | str) -> str:
    """Collapse a (possibly multi-line, e.g. libvips) error message to one line."""
    return " ".join(str(err).split()) or type(err).__name__


def mag_from_mpp(mpp: float) -> float:
    """Magnification implied by microns per pixel (10x ~ 1 um/px); snapped to a common objective power."""
    raw = 10.0 / mpp
    nearest = min(COMMON_POWERS, key=lambda power: abs(math.log(raw / power)))
    if abs(raw / nearest - 1.0) <= SNAP_TOLERANCE:
        return nearest
    return float(f"{raw:.3g}")


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


def _positive_float(text: Any) -> float | None:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


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


@dataclass(frozen=True)
class _TiffLevel:
    width: int
    height: int
    page: int
    subifd: int  # -1: the page itself; k >= 0: that page's k-th SubIFD


def _is_level_of(page: tifffile.TiffPage, width0: int, height0: int) -> bool:
    """A smaller copy of the whole level-0 image: same aspect ratio (within rounding of the downsample)."""
    width, height = int(page.imagewidth), int(page.imagelength)
    if not (width < width0 and height < height0):
        return False
    return abs(height - height0 * width / width0) <= max(2.0, 0.01 * height)


def _tiff_levels(path: str, tif: tifffile.TiffFile) -> list[_TiffLevel]:
    """Pyramid levels (SubIFDs, or tiled pages that are whole-slide downsamples), largest first; checks every
    level's data lies inside the file.

    Pages are scanned directly: tifffile's series stop at the first page flagged 'reduced' (SVS) or miss
    SubIFD pyramids with /16 steps. Stripped pages (Aperio thumbnail, label, macro) are not levels,
    as in OpenSlide.
    """
    page0 = tif.pages[0]
    width0, height0 = int(page0.imagewidth), int(page0.imagelength)
    file_size = tif.filehandle.size
    found: list[tuple[_TiffLevel, tifffile.TiffPage]] = [(_TiffLevel(width0, height0, 0, -1), page0)]
    if page0.subifds:
        for k, sub in enumerate(page0.pages):
            found.append((_TiffLevel(int(sub.imagewidth), int(sub.imagelength), 0, k), sub))
    else:
        for page in tif.pages[1:]:
            if page.is_tiled and _is_level_of(page, width0, height0):
                found.append((_TiffLevel(int(page.imagewidth), int(page.imagelength), int(page.index), -1), page))
    for index, (_, page) in enumerate(found):
        ends = [off + count for off, count in zip(page.dataoffsets, page.databytecounts) if count]
        if ends and max(ends) > file_size:
            raise SlideError(f"{path}: truncated file (level {index} image data ends past the end of the file)")
    return [level for level, _ in sorted(found, key=lambda item: -item[0].width)]


def _as_srgb_uchar(image: pyvips.Image) -> pyvips.Image:
    """3-band 8-bit RGB; alpha is composited on white (background of a glass slide)."""
    if image.format == "ushort":
        image = (image >> 8).cast("uchar")  # a constant shift: no pass over the whole (huge) image
    elif image.format != "uchar":
        raise pyvips.Error(f"unsupported pixel format {image.format} (expected 8- or 16-bit)")
    if image.hasalpha():
        image = image.flatten(background=[255.0] * (image.bands - 1))
    if image.bands == 1:
        image = image.bandjoin([image, image])
    elif image.bands > 3:
        image = image.extract_band(0, n=3)
    return image


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


def _rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


@functools.lru_cache(maxsize=512)
def _reducev_gain(length: int, shrink: float) -> np.ndarray:
    """Per-output-row gain (the sum of the fixed-point Lanczos3 weights) of vips reducev over `length` rows,
    measured by filtering a constant ushort column; uchar uses the same integer masks."""
    column = (pyvips.Image.black(1, length) + GAIN_PROBE).cast("ushort")
    gain = column.reducev(shrink, kernel="lanczos3").numpy().reshape(-1).astype(np.float32) / GAIN_PROBE
    gain.flags.writeable = False  # cached: shared between callers
    return gain


def lanczos_to_size(image: pyvips.Image, size: tuple[int, int], precise: bool = PRECISE_RESAMPLE) -> pyvips.Image:
    """Lanczos3-resample `image` to exactly `size` (w, h), lazily (nothing is computed until pixels are asked for).

    vips `resize` box-pre-shrinks before its Lanczos pass, so reducev + reduceh are used for downsampling; each
    output length is round(in / shrink), and any float off-by-one is fixed by copying/cropping the edge pixel.

    `precise` (8-bit input): the costly first pass (reducev over all level-0 rows) runs in vips' fast 8-bit
    fixed point, whose integer masks sum to less than 1 (0.998 at 4x, 0.997 at 16x, 0.983 at 64x: a pure
    gain); the second pass, over shrink-times fewer pixels, runs in float, and the measured first-pass gain is
    divided out before the single final rounding. Unbiased against PIL LANCZOS at a fraction of the cost of
    an all-float filter (numbers in the module docstring). precise=False: vips' plain 8-bit path.
    """
    out_w, out_h = size
    hshrink, vshrink = image.width / out_w, image.height / out_h
    if hshrink < 1.0 or vshrink < 1.0:
        # Only from rounding at mag == base_mag (a pixel or two); reduce cannot enlarge.
        image = image.resize(1.0 / hshrink, vscale=1.0 / vshrink, kernel="lanczos3")
    else:
        if hshrink > MAX_LANCZOS_SHRINK or vshrink > MAX_LANCZOS_SHRINK:
            pre_h = max(1, math.ceil(hshrink / MAX_LANCZOS_SHRINK))
            pre_v = max(1, math.ceil(vshrink / MAX_LANCZOS_SHRINK))
            image = image.shrink(pre_h, pre_v)
            hshrink, vshrink = image.width / out_w, image.height / out_h
        correct = precise and image.format == "uchar"
        gain = None
        if vshrink > 1.0:
            if correct:
                gain = _reducev_gain(image.height, vshrink)
            image = image.reducev(vshrink, kernel="lanczos3")
            if hshrink > 1.0:  # reduceh asks for overlapping strips: uncached, reducev recomputes them (4x at 64x)
                across = math.ceil(image.width / PASS_CACHE_TILE[0]) + 1
                image = image.tilecache(tile_width=PASS_CACHE_TILE[0], tile_height=PASS_CACHE_TILE[1],
                                        max_tiles=5 * across, threaded=True)
        if correct:
            image = image.cast("float")
        if hshrink > 1.0:
            image = image.reduceh(hshrink, kernel="lanczos3")
        if correct:
            if gain is not None:
                image = image * pyvips.Image.new_from_array((1.0 / gain)[:, None]).replicate(image.width, 1)
            image = image.rint().cast("uchar")  # cast clips ringing to 0..255
    if (image.width, image.height) != (out_w, out_h):
        image = image.embed(0, 0, out_w, out_h, extend="copy")
    return image


def _even_steps(length: int, most: int) -> list[tuple[int, int]]:
    """[start, stop) pieces of 0..length, as few as keep each <= most, of near-equal size (margins cost less)."""
    count = math.ceil(length / most)
    return [(length * i // count, length * (i + 1) // count) for i in range(count)]


def _output_span(start: int, stop: int, total: int, out_len: int) -> tuple[int, int]:
    """Output pixels [a, b) whose centres come from level-0 [start, stop) of `total`; consecutive spans tile."""
    return round(start * out_len / total), (out_len if stop >= total else round(stop * out_len / total))


def resample_together(source: pyvips.Image, sizes: Mapping[float, tuple[int, int]],
                      window: int | None = None) -> dict[float, np.ndarray]:
    """Lanczos3-resample one lazy uchar image (a level-0 box) to every size in {key: (w, h)}, decoding it once.

    The box is cut into near-equal pieces of at most `window` (default FETCH_WINDOW) px a side. Each piece,
    grown by the widest filter's support (4 x the largest shrink), is decoded into memory once and embedded at
    its place in an otherwise black box-size frame; every size is then resampled from that frame by the same
    whole-box pipeline (lanczos_to_size) and only the output block whose pixel centres lie in the piece is
    computed. An output pixel reads only level-0 pixels within its filter support, all of which are real here,
    so the blocks are exactly the whole-box result and tile without seams.
    """
    window = window or FETCH_WINDOW
    box_w, box_h = source.width, source.height
    shrink = max(max(box_w / w, box_h / h) for w, h in sizes.values())
    margin = math.ceil(4 * max(shrink, 1.0)) + 4  # support 3 x shrink, plus the block's rounding, plus slack
    outs = {key: np.empty((h, w, source.bands), dtype=np.uint8) for key, (w, h) in sizes.items()}
    for y, y_end in _even_steps(box_h, window):
        for x, x_end in _even_steps(box_w, window):
            x0, y0 = max(0, x - margin), max(0, y - margin)
            x1, y1 = min(box_w, x_end + margin), min(box_h, y_end + margin)
            frame = source.crop(x0, y0, x1 - x0, y1 - y0).copy_memory().embed(x0, y0, box_w, box_h)
            for key, (w, h) in sizes.items():
                ox0, ox1 = _output_span(x, x_end, box_w, w)
                oy0, oy1 = _output_span(y, y_end, box_h, h)
                if ox1 > ox0 and oy1 > oy0:  # vips' own sink: small cache-friendly tiles, VIPS_CONCURRENCY threads
                    data = lanczos_to_size(frame, (w, h)).crop(ox0, oy0, ox1 - ox0, oy1 - oy0).write_to_memory()
                    outs[key][oy0:oy1, ox0:ox1] = np.frombuffer(data, np.uint8).reshape(oy1 - oy0, ox1 - ox0, -1)
    return outs


class Slide:
    """An open slide. Use as a context manager or call close()."""

    def __init__(self, info: SlideInfo, *, osr: openslide.OpenSlide | None, tiff_levels: list[_TiffLevel] | None):
        self.info = info
        self._osr = osr
        self._tiff_levels = tiff_levels  # None: pixels come from OpenSlide
        self._level0: pyvips.Image | None = None

    @property
    def backend(self) -> str:
        return "vips" if self._tiff_levels is not None else "openslide"

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None
        self._level0 = None

    def _fail(self, what: str, err: BaseException) -> SlideError:
        return SlideError(f"{self.info.path}: {what}: {one_line(err)}")

    def _level0_image(self) -> pyvips.Image:
        if self._level0 is None:
            assert self._tiff_levels is not None
            self._level0 = self._tiff_level(self._tiff_levels[0])
        return self._level0

    def _tiff_level(self, level: _TiffLevel) -> pyvips.Image:
        image = pyvips.Image.tiffload(self.info.path, page=level.page, subifd=level.subifd, fail_on="error")
        return _as_srgb_uchar(image)

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """RGB thumbnail whose long side is at most `max_size`, and level-0 px per thumbnail px.

        Decoded from the coarsest pyramid level still at least `max_size` on its long side, so a big slide's
        level 0 is never decoded when the slide has a pyramid; reduced with vips' 8-bit Lanczos (fast; tissue
        finding and QC need no sub-grey-level precision).
        """
        if max_size < 1:
            raise SlideError(f"{self.info.path}: thumbnail size must be >= 1, got {max_size}")
        try:
            if self._tiff_levels is not None:
                adequate = [lv for lv in self._tiff_levels if max(lv.width, lv.height) >= max_size]
                level = min(adequate, key=lambda lv: lv.width) if adequate else self._tiff_levels[0]
                image = self._tiff_level(level)
                scale = max_size / max(image.width, image.height)
                if scale < 1.0:
                    out = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                    # Tissue finding needs no resampling precision: box-shrink to within 2x of the size,
                    # then vips' fast 8-bit Lanczos (not the float-precise path the crops use).
                    pre = int(1.0 / scale) // 2
                    if pre >= 2:
                        image = image.shrink(pre, pre)
                    image = lanczos_to_size(image, out, precise=False)
                thumb = image.numpy()
            else:
                assert self._osr is not None
                thumb = np.asarray(self._osr.get_thumbnail((max_size, max_size)).convert("RGB"))
        except (pyvips.Error, openslide.OpenSlideError) as err:
            raise self._fail("cannot read thumbnail", err) from None
        return np.ascontiguousarray(thumb, dtype=np.uint8), self.info.width / thumb.shape[1]

    def read_at_mag(self, box_l0: tuple[int, int, int, int], mag: float, size: tuple[int, int]) -> np.ndarray:
        """The level-0 box (x, y, w, h) Lanczos3-resampled to `size` (w, h) -> (h, w, 3) uint8 RGB.

        `mag` is checked against the base magnification; the resampling factor comes from box and size (see
        target_size). Parts of the box outside the slide read as white.
        """
        return self.read_at_mags(box_l0, {mag: size})[mag]

    def read_at_mags(self, box_l0: tuple[int, int, int, int],
                     sizes: Mapping[float, tuple[int, int]]) -> dict[float, np.ndarray]:
        """The level-0 box at several magnifications {mag: (w, h)} -> {mag: (h, w, 3) uint8 RGB}, decoding the
        level-0 pixels once for all of them.

        Every mag is Lanczos3-resampled directly from level-0 pixels (never from another mag's output) and is
        identical to read_at_mag(box_l0, mag, size); see resample_together for how the work is shared.
        """
        path = self.info.path
        x, y, w, h = (int(v) for v in box_l0)
        wanted = {mag: (int(size[0]), int(size[1])) for mag, size in sizes.items()}
        if w < 1 or h < 1 or not wanted or any(ow < 1 or oh < 1 for ow, oh in wanted.values()):
            raise SlideError(f"{path}: empty box {tuple(box_l0)} or sizes {dict(sizes)}")
        for mag in wanted:
            if mag > self.info.base_mag * (1 + 1e-9):
                raise SlideError(
                    f"{path}: magnification {mag:g}x exceeds the base magnification {self.info.base_mag:g}x")
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.info.width), min(y + h, self.info.height)
        if x1 <= x0 or y1 <= y0:
            raise SlideError(f"{path}: box {tuple(box_l0)} lies outside the {self.info.width}x{self.info.height} slide")
        inner = (x0, y0, x1 - x0, y1 - y0)
        placement = (x0 - x, y0 - y, w, h)
        try:
            if self._tiff_levels is not None:
                return self._resample(self._level0_image().crop(*inner), placement, wanted)
            return self._read_openslide(inner, placement, wanted)
        except (pyvips.Error, openslide.OpenSlideError) as err:
            raise self._fail(f"cannot read box {tuple(box_l0)}", err) from None

    @staticmethod
    def _resample(crop: pyvips.Image, placement: tuple[int, int, int, int],
                  sizes: Mapping[float, tuple[int, int]]) -> dict[float, np.ndarray]:
        left, top, w, h = placement
        if (left, top, w, h) != (0, 0, crop.width, crop.height):
            crop = crop.embed(left, top, w, h, extend="white")
        return resample_together(crop, sizes)

    def _read_openslide(self, inner, placement, sizes) -> dict[float, np.ndarray]:
        """OpenSlide fallback: stream level-0 blocks into a memory-mapped raw file once, then the same vips resample."""
        assert self._osr is not None
        x0, y0, w, h = inner
        with tempfile.TemporaryDirectory(prefix="hpcdistill-slide-") as scratch:
            raw_path = os.path.join(scratch, "level0.raw")
            pixels = np.memmap(raw_path, dtype=np.uint8, mode="w+", shape=(h, w, 3))
            for by in range(0, h, OPENSLIDE_BLOCK):
                for bx in range(0, w, OPENSLIDE_BLOCK):
                    bw, bh = min(OPENSLIDE_BLOCK, w - bx), min(OPENSLIDE_BLOCK, h - by)
                    rgba = np.asarray(self._osr.read_region((x0 + bx, y0 + by), 0, (bw, bh)))
                    pixels[by : by + bh, bx : bx + bw] = _rgba_to_rgb_on_white(rgba)
            pixels.flush()
            del pixels
            crop = pyvips.Image.rawload(raw_path, w, h, 3).copy(interpretation="srgb")
            return self._resample(crop, placement, sizes)


def open_slide(path: str | os.PathLike, base_mag: float | None = None, *, backend: str | None = None) -> Slide:
    """Open a slide; base magnification from `base_mag`, else objective power, else mpp. SlideError if none.

    `backend` forces the pixel reader ("vips" or "openslide"); default: vips for SVS / generic TIFF, else OpenSlide.
    """
    path = os.fspath(path)
    if backend not in (None, "vips", "openslide"):
        raise SlideError(f"{path}: backend {backend!r}: expected 'vips' or 'openslide'")
    if not os.path.isfile(path):
        raise SlideError(f"{path}: no such file")
    if base_mag is not None and not (math.isfinite(base_mag) and base_mag > 0):
        raise SlideError(f"{path}: base magnification must be positive, got {base_mag}")

    osr: openslide.OpenSlide | None = None
    try:
        osr = openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        osr = None
    except openslide.OpenSlideError as err:
        raise SlideError(f"{path}: unreadable slide: {one_line(err)}") from None
    try:
        slide = _open(path, osr, base_mag)
    except BaseException:
        if osr is not None:
            osr.close()
        raise
    if backend is not None and backend != slide.backend:
        if backend == "vips" or slide._osr is None:
            slide.close()
            raise SlideError(f"{path}: the {backend} backend cannot read this slide")
        slide._tiff_levels = None
    return slide


def _open(path: str, osr: openslide.OpenSlide | None, base_mag: float | None) -> Slide:
    props = dict(osr.properties) if osr is not None else {}
    vendor = props.get("openslide.vendor")
    tiff_levels: list[_TiffLevel] | None = None
    description, res_mpp = "", None
    tiff_error: BaseException | None = None
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            page0 = tif.pages[0]
            description = page0.description or ""
            res_mpp = _mpp_from_resolution(page0)
            if vendor in VIPS_VENDORS:
                tiff_levels = _tiff_levels(path, tif)
    except SlideError:
        raise
    except Exception as err:  # tifffile raises many types on corrupt input; all mean "not a readable TIFF"
        tiff_error = err
    if osr is None and tiff_levels is None:
        reason = f" ({one_line(tiff_error)})" if tiff_error else ""
        raise SlideError(f"{path}: unsupported or corrupt slide: neither OpenSlide nor tifffile can read it{reason}")
    if osr is None and description.startswith("Aperio"):
        # OpenSlide rejects Aperio files whose directory chain is broken; tifffile alone would hide it.
        raise SlideError(f"{path}: corrupt Aperio SVS (OpenSlide cannot parse its directories)")
    if tiff_levels is not None:
        try:
            level0 = pyvips.Image.tiffload(path, page=0, fail_on="error")
        except pyvips.Error as err:
            if osr is None:
                raise SlideError(f"{path}: unreadable TIFF: {one_line(err)}") from None
            tiff_levels = None  # e.g. a compression libvips lacks: OpenSlide can still read it
        else:
            if (level0.width, level0.height) != (tiff_levels[0].width, tiff_levels[0].height):
                raise SlideError(f"{path}: libvips and tifffile disagree on the level-0 size")

    mpp = _positive_float(props.get("openslide.mpp-x")) or _aperio_field(description, "MPP") or res_mpp
    objective = _positive_float(props.get("openslide.objective-power")) or _aperio_field(description, "AppMag")
    if base_mag is not None:
        mag, source = float(base_mag), "override"
    elif objective is not None:
        mag, source = objective, "objective-power"
    elif mpp is not None:
        mag, source = mag_from_mpp(mpp), "mpp"
    else:
        raise SlideError(f"{path}: no magnification metadata (objective power or mpp); pass --base-mag")

    if tiff_levels is not None:
        width, height, level_count = tiff_levels[0].width, tiff_levels[0].height, len(tiff_levels)
    else:
        assert osr is not None
        (width, height), level_count = osr.dimensions, osr.level_count
    info = SlideInfo(
        path=path, width=int(width), height=int(height), base_mag=mag, mpp=mpp, mag_source=source,
        vendor=vendor or "tiff", level_count=int(level_count),
    )
    return Slide(info, osr=osr, tiff_levels=tiff_levels)
