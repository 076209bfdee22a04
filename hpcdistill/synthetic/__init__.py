"""Synthetic H&E slides for the demo and the tests: the scene, written as true Aperio SVS or pyramidal TIFF files, and
labelled datasets of them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcdistill.synthetic.dataset import write_dataset, write_slide
    from hpcdistill.synthetic.scene import make_scene, render_region

__all__ = ["make_scene", "render_region", "write_dataset", "write_slide"]
# Each name's module loads on first use (PEP 562): importing any module of this package runs this file, and
# a test that needs one writer does not load the others' codecs.
# The TYPE_CHECKING imports above are what type checkers and IDEs read.
_HOMES = {"write_dataset": "dataset", "write_slide": "dataset", "make_scene": "scene", "render_region": "scene"}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
