"""Whole-slide images: the `Slide` interface, one backend per reader and the factory that picks one, what a file says
about itself, exact Lanczos resampling, tissue on a thumbnail, tissue windows, outlines and regions, and the slide
catalog with its labels CSV."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcdistill.slides.catalog import collect_slides, read_labels_csv
    from hpcdistill.slides.factory import open_slide
    from hpcdistill.slides.mag_scale import MagScale
    from hpcdistill.slides.metadata import base_magnification
    from hpcdistill.slides.resample import lanczos_to_size
    from hpcdistill.slides.slide import Slide, SlideInfo, target_size
    from hpcdistill.slides.tissue import TissueParams, find_tissues
    from hpcdistill.slides.windows import Windowing, find_windows

__all__ = [
    "MagScale",
    "Slide",
    "SlideInfo",
    "TissueParams",
    "Windowing",
    "base_magnification",
    "collect_slides",
    "find_tissues",
    "find_windows",
    "lanczos_to_size",
    "open_slide",
    "read_labels_csv",
    "target_size",
]
# Each name's module loads on first use (PEP 562): importing any module of this package runs this file, and
# training reads windows without pyvips or OpenSlide.
# The TYPE_CHECKING imports above are what type checkers and IDEs read.
_HOMES = {
    "collect_slides": "catalog",
    "read_labels_csv": "catalog",
    "open_slide": "factory",
    "MagScale": "mag_scale",
    "base_magnification": "metadata",
    "lanczos_to_size": "resample",
    "Slide": "slide",
    "SlideInfo": "slide",
    "target_size": "slide",
    "TissueParams": "tissue",
    "find_tissues": "tissue",
    "Windowing": "windows",
    "find_windows": "windows",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
