"""The pixel readers behind `open_slide`, one class per backend, and `probe`: what can read a file and its info.

VipsTiffSlide reads SVS and pyramidal TIFF with libvips tiffload (demand-driven, so memory stays bounded for any
box size). OpenSlideSlide reads what tiffload cannot (NDPI, MRXS, Ventana, ...) into a memory-mapped scratch
file, which the shared code in slide.py then resamples exactly as it does tiffload's pixels.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from typing import Iterator

import numpy as np
import openslide
import pyvips

from hpcdistill.common.errors import SlideError, one_line
from hpcdistill.common.limits import limit, raise_hint
from hpcdistill.common.signals import signal_pending
from hpcdistill.slides.mag_scale import PHYSICAL_SCALE, MagScale
from hpcdistill.slides.metadata import TiffLevel, base_magnification, check_level_sizes, metadata_conflicts, probe_tiff
from hpcdistill.slides.resample import lanczos_to_size
from hpcdistill.slides.slide import Level, Slide, SlideInfo

# TIFF-based vendors whose level 0 libvips tiffload reads as a plain page 0.
VIPS_VENDORS = {None, "aperio", "generic-tiff"}
# Block edge (level-0 px) for OpenSlide reads.
OPENSLIDE_BLOCK = 2048
# A thumbnail's source level up to this size is decoded once per open slide and kept (50 MB of RGB): tissue is
# found on one thumbnail and outlined on a finer one, usually from the same level.
THUMB_LEVEL_KEEP_PIXELS = 2**24


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


def _rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


_UNIQUE = itertools.count(1)


def _stop_on_signal(image: pyvips.Image, progress: object) -> None:
    if signal_pending():
        image.set_kill(True)


def stoppable(image: pyvips.Image) -> pyvips.Image:
    """A copy of `image` whose computations (and those of every image made from it: libvips passes the progress
    signal down the pipeline) stop within a moment of SIGTERM or SIGINT, instead of decoding on to the end of a huge
    level. Keep the returned object alive while anything made from it computes: it owns the callback. The copy is
    unique (its xoffset is a counter), so libvips' operation cache never hands it out again once it is gone."""
    copy = image.copy(xoffset=next(_UNIQUE))
    copy.set_progress(True)
    copy.signal_connect("eval", _stop_on_signal)
    return copy


class VipsTiffSlide(Slide):
    """SVS / generic pyramidal TIFF read with libvips tiffload."""

    backend = "vips"
    read_errors = (pyvips.Error,)

    def __init__(self, info: SlideInfo, levels: list[TiffLevel]):
        super().__init__(info)
        self._levels = levels
        first = levels[0]
        self._pyramid = [
            Level(i, lv.width, lv.height, first.width / lv.width, first.height / lv.height)
            for i, lv in enumerate(levels)
        ]
        self._images: dict[int, pyvips.Image] = {}
        self._decoded: dict[int, np.ndarray] = {}  # thumbnail source levels, decoded (THUMB_LEVEL_KEEP_PIXELS)

    def close(self) -> None:
        self._images.clear()
        self._decoded.clear()

    def levels(self) -> list[Level]:
        return self._pyramid

    def _level_image(self, index: int) -> pyvips.Image:
        if index not in self._images:
            self._images[index] = self._tiff_level(self._levels[index])
        return self._images[index]

    def _tiff_level(self, level: TiffLevel) -> pyvips.Image:
        image = pyvips.Image.tiffload(self.info.path, page=level.page, subifd=level.subifd, fail_on="error")
        return _as_srgb_uchar(image)

    def _read_level(self, level: Level, box: tuple[int, int, int, int]) -> contextlib.nullcontext[pyvips.Image]:
        if level.index in self._decoded:  # the thumbnail's level, already decoded: the same pixels, no JPEG again
            return contextlib.nullcontext(pyvips.Image.new_from_array(self._decoded[level.index]).crop(*box))
        return contextlib.nullcontext(self._level_image(level.index).crop(*box))

    def _read_thumbnail(self, max_size: int) -> np.ndarray:
        """Decoded from the coarsest pyramid level still at least `max_size` on its long side, so a big slide's
        level 0 is never decoded when the slide has a pyramid; reduced with vips' 8-bit Lanczos (fast; tissue
        finding and QC need no sub-grey-level precision).
        """
        adequate = [lv for lv in self._levels if max(lv.width, lv.height) >= max_size]
        level = min(adequate, key=lambda lv: lv.width) if adequate else self._levels[0]
        if level.width * level.height > limit("thumbnail_source_pixels"):
            raise SlideError(
                f"{self.info.path}: a {max_size} px thumbnail would decode a {level.width}x{level.height} level "
                f"({raise_hint('thumbnail_source_pixels')}, or ask for a smaller thumbnail)"
            )
        image = guard = self._thumbnail_source(level)
        scale = max_size / max(image.width, image.height)
        if scale < 1.0:
            out = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            # Box-shrink to within 2x of the size, then vips' fast 8-bit Lanczos (not the float-precise path the
            # crops use).
            pre = int(1.0 / scale) // 2
            if pre >= 2:
                image = image.shrink(pre, pre)
            pixels = lanczos_to_size(image, out, precise=False)
        else:
            pixels = image.numpy()
        del guard  # only now: the callback it owns ran during the computation above
        return pixels

    def _thumbnail_source(self, level: TiffLevel) -> pyvips.Image:
        """The level a thumbnail is made from, stoppable (the one read that decodes a whole level); a small level is
        decoded once and its pixels kept, so a second thumbnail of this slide costs no decode (the same pixels, so
        the same thumbnail as from the file)."""
        index = self._levels.index(level)
        if index in self._decoded:
            return pyvips.Image.new_from_array(self._decoded[index])
        image = stoppable(self._tiff_level(level))
        if level.width * level.height > THUMB_LEVEL_KEEP_PIXELS:
            return image
        self._decoded[index] = image.numpy().reshape(image.height, image.width, image.bands)
        return pyvips.Image.new_from_array(self._decoded[index])


class OpenSlideSlide(Slide):
    """Any slide OpenSlide reads; level-0 blocks are streamed into a memory-mapped raw file, then resampled."""

    backend = "openslide"
    read_errors = (pyvips.Error, openslide.OpenSlideError)

    def __init__(self, info: SlideInfo, osr: openslide.OpenSlide):
        super().__init__(info)
        self._osr: openslide.OpenSlide | None = osr

    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None

    def _read_thumbnail(self, max_size: int) -> np.ndarray:
        assert self._osr is not None
        return np.asarray(self._osr.get_thumbnail((max_size, max_size)).convert("RGB"))

    def levels(self) -> list[Level]:
        assert self._osr is not None
        (w0, h0), dims = self._osr.level_dimensions[0], self._osr.level_dimensions
        return [Level(i, w, h, w0 / w, h0 / h) for i, (w, h) in enumerate(dims)]

    @contextlib.contextmanager
    def _read_level(self, level: Level, box: tuple[int, int, int, int]) -> Iterator[pyvips.Image]:
        """Blocks of the level streamed into a memory-mapped raw file (OpenSlide takes level-0 locations)."""
        assert self._osr is not None
        x0, y0, w, h = box
        with tempfile.TemporaryDirectory(prefix="hpcdistill-slide-") as scratch:
            raw_path = os.path.join(scratch, "level.raw")
            pixels = np.memmap(raw_path, dtype=np.uint8, mode="w+", shape=(h, w, 3))
            for by in range(0, h, OPENSLIDE_BLOCK):
                for bx in range(0, w, OPENSLIDE_BLOCK):
                    bw, bh = min(OPENSLIDE_BLOCK, w - bx), min(OPENSLIDE_BLOCK, h - by)
                    origin = (round((x0 + bx) * level.scale_x), round((y0 + by) * level.scale_y))
                    rgba = np.asarray(self._osr.read_region(origin, level.index, (bw, bh)))
                    pixels[by : by + bh, bx : bx + bw] = _rgba_to_rgb_on_white(rgba)
            pixels.flush()
            del pixels
            yield pyvips.Image.rawload(raw_path, w, h, 3).copy(interpretation="srgb")


def probe(
    path: str, base_mag: float | None, scale: MagScale = PHYSICAL_SCALE
) -> tuple[SlideInfo, openslide.OpenSlide | None, list[TiffLevel] | None]:
    """(info, an open OpenSlide handle or None, the TIFF levels libvips reads or None); SlideError when neither
    backend can read the file or its magnification is unknown. The caller owns (closes) the handle."""
    osr = _open_openslide(path)
    try:
        return _probe_with(path, osr, base_mag, scale)
    except BaseException:
        if osr is not None:
            osr.close()
        raise


def _open_openslide(path: str) -> openslide.OpenSlide | None:
    """An OpenSlide handle; None for a format OpenSlide does not know."""
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        return None
    except openslide.OpenSlideError as err:
        raise SlideError(f"{path}: unreadable slide: {one_line(err)}") from None


def _probe_with(
    path: str, osr: openslide.OpenSlide | None, base_mag: float | None, scale: MagScale
) -> tuple[SlideInfo, openslide.OpenSlide | None, list[TiffLevel] | None]:
    props = dict(osr.properties) if osr is not None else {}
    vendor = props.get("openslide.vendor")
    tiff = probe_tiff(path, with_levels=vendor in VIPS_VENDORS)
    if osr is None and tiff.levels is None:
        reason = f" ({one_line(tiff.error)})" if tiff.error else ""
        raise SlideError(f"{path}: unsupported or corrupt slide: neither OpenSlide nor tifffile can read it{reason}")
    if osr is None and tiff.description.startswith("Aperio"):
        # OpenSlide rejects Aperio files whose directory chain is broken; tifffile alone would hide it.
        raise SlideError(f"{path}: corrupt Aperio SVS (OpenSlide cannot parse its directories)")
    sizes = [(lv.width, lv.height) for lv in tiff.levels] if tiff.levels is not None else None
    check_level_sizes(path, sizes or [tuple(map(int, d)) for d in osr.level_dimensions])  # before any decoding
    levels = _vips_readable(path, tiff.levels, osr) if tiff.levels is not None else None
    mag, source, mpp = base_magnification(path, props, tiff.description, tiff.res_mpp, base_mag, scale)
    if levels is not None:
        width, height, level_count = levels[0].width, levels[0].height, len(levels)
    else:
        assert osr is not None
        (width, height), level_count = osr.dimensions, osr.level_count
    info = SlideInfo(
        path=path,
        width=int(width),
        height=int(height),
        base_mag=mag,
        mpp=mpp,
        mag_source=source,
        vendor=vendor or "tiff",
        level_count=int(level_count),
        notes=tuple(
            metadata_conflicts(props, tiff.description, tiff.res_mpp, (int(width), int(height)), (mag, source))
        ),
    )
    return info, osr, levels


def _vips_readable(path: str, levels: list[TiffLevel], osr: openslide.OpenSlide | None) -> list[TiffLevel] | None:
    """`levels` if libvips reads level 0 as tifffile sees it; None if not but OpenSlide can; else SlideError."""
    try:
        level0 = pyvips.Image.tiffload(path, page=0, fail_on="error")
    except pyvips.Error as err:
        if osr is None:
            raise SlideError(f"{path}: unreadable TIFF: {one_line(err)}") from None
        return None  # e.g. a compression libvips lacks: OpenSlide can still read it
    if (level0.width, level0.height) != (levels[0].width, levels[0].height):
        raise SlideError(f"{path}: libvips and tifffile disagree on the level-0 size")
    return levels
