"""Slides to WebDataset shards and back: the plan, cutting one slide, the tar writer and its journal, the manifest,
the safe reader, the sharding flow and its array of tasks."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcdistill.shards.array import plan_array, shard_jobs
    from hpcdistill.shards.manifest import read_manifest
    from hpcdistill.shards.plan import ShardParams
    from hpcdistill.shards.reader import ShardSet, decode_sample, raw_samples
    from hpcdistill.shards.sample_format import image_member, label_members, sample_key
    from hpcdistill.shards.sharding import preview_sharding, run_sharding

__all__ = [
    "ShardParams",
    "ShardSet",
    "decode_sample",
    "image_member",
    "label_members",
    "plan_array",
    "preview_sharding",
    "raw_samples",
    "read_manifest",
    "run_sharding",
    "sample_key",
    "shard_jobs",
]
# Each name's module loads on first use (PEP 562): importing any module of this package runs this file, and
# reading shards does not load pyvips.
# The TYPE_CHECKING imports above are what type checkers and IDEs read.
_HOMES = {
    "plan_array": "array",
    "shard_jobs": "array",
    "read_manifest": "manifest",
    "ShardParams": "plan",
    "ShardSet": "reader",
    "decode_sample": "reader",
    "raw_samples": "reader",
    "image_member": "sample_format",
    "label_members": "sample_format",
    "sample_key": "sample_format",
    "preview_sharding": "sharding",
    "run_sharding": "sharding",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
