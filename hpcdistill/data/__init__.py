"""Shards to batches: the per-rank streams and loaders, the paired augmentation draw and standardisation, and the batch
finished where the model runs."""

from hpcdistill.common.lazy_exports import lazy_exports

_EXPORTS = {
    "ShardLoader": "streams",
    "make_loader": "streams",
    "StreamSpec": "streams",
    "AugmentDraw": "augment",
    "Standardizer": "augment",
    "finish_batch": "device_batch",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
