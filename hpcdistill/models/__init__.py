"""The GroupNorm ResNets, the export format and its reader, and the one loop that runs a model over a stream of
tissues."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcdistill.models.export import ExportedModel, export_blob, load_exported
    from hpcdistill.models.inference import model_outputs, pick_device
    from hpcdistill.models.resnet import ResNet, build_model

__all__ = ["ExportedModel", "ResNet", "build_model", "export_blob", "load_exported", "model_outputs", "pick_device"]
# Each name's module loads on first use (PEP 562): importing any module of this package runs this file, and
# the export reader does not build every network.
# The TYPE_CHECKING imports above are what type checkers and IDEs read.
_HOMES = {
    "ExportedModel": "export",
    "export_blob": "export",
    "load_exported": "export",
    "model_outputs": "inference",
    "pick_device": "inference",
    "ResNet": "resnet",
    "build_model": "resnet",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
