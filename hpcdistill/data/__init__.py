"""Shards to batches: the per-rank streams and loaders, the paired augmentation draw and standardisation, and the batch
finished where the model runs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcdistill.data.augment import AugmentDraw, Standardizer
    from hpcdistill.data.device_batch import finish_batch
    from hpcdistill.data.streams import ShardLoader, StreamSpec, make_loader

__all__ = ["AugmentDraw", "ShardLoader", "Standardizer", "StreamSpec", "finish_batch", "make_loader"]
# Each name's module loads on first use (PEP 562): importing any module of this package runs this file, and
# a loader worker loads only what it decodes with.
# The TYPE_CHECKING imports above are what type checkers and IDEs read.
_HOMES = {
    "AugmentDraw": "augment",
    "Standardizer": "augment",
    "finish_batch": "device_batch",
    "ShardLoader": "streams",
    "StreamSpec": "streams",
    "make_loader": "streams",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
