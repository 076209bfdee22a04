"""`open_slide`: the backend that reads a file. libvips tiffload for SVS and generic pyramidal TIFF, OpenSlide for
what tiffload cannot read (NDPI, MRXS, Ventana, ...) and for DICOM WSI (a folder of instances, read by OpenSlide 4's
own DICOM support: no other library is needed to read them)."""

from __future__ import annotations

import dataclasses
import math
import os

from hpcdistill.common.console import say
from hpcdistill.common.errors import SlideError
from hpcdistill.common.limits import regular_file
from hpcdistill.slides.backends import OpenSlideSlide, VipsTiffSlide, probe
from hpcdistill.slides.catalog import dicom_instance
from hpcdistill.slides.mag_scale import PHYSICAL_SCALE, MagScale
from hpcdistill.slides.slide import Slide


def open_slide(
    path: str | os.PathLike,
    base_mag: float | None = None,
    *,
    scale: MagScale = PHYSICAL_SCALE,
    backend: str | None = None,
) -> Slide:
    """Open a slide; base magnification from `base_mag`, else from its pixel size or objective power as `scale`
    says (slides.mag_scale). SlideError if none is known.

    `backend` forces the pixel reader ("vips" or "openslide"); default: vips for SVS / generic TIFF, else OpenSlide.
    The info (size, levels, magnification) is the same whichever backend reads the pixels.
    """
    path = os.fspath(path)
    if backend not in (None, "vips", "openslide"):
        raise SlideError(f"{path}: backend {backend!r}: expected 'vips' or 'openslide'")
    opened = str(dicom_instance(path)) if os.path.isdir(path) else path  # a DICOM WSI folder: one of its levels
    regular_file(opened, SlideError)  # a FIFO would block, a device never end
    if base_mag is not None and not (math.isfinite(base_mag) and base_mag > 0):
        raise SlideError(f"{path}: base magnification must be positive, got {base_mag}")
    info, osr, levels = probe(opened, base_mag, scale)
    info = dataclasses.replace(info, path=path)  # named as the user named it (a DICOM slide by its folder)
    for note in info.notes:
        say(f"{path}: {note}")
    chosen = backend or ("vips" if levels is not None else "openslide")
    if chosen == "openslide" and osr is not None:
        return OpenSlideSlide(info, osr)
    if osr is not None:
        osr.close()
    if chosen == "vips" and levels is not None:
        return VipsTiffSlide(info, levels)
    raise SlideError(f"{path}: the {backend} backend cannot read this slide")
