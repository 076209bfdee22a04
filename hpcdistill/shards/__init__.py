"""Slides to WebDataset shards and back: slide catalog and labels, the plan, cutting one slide, the tar writer and its
journal, the manifest, the safe reader, the sharding flow and its array of tasks."""

from hpcdistill.common.lazy_exports import lazy_exports

_EXPORTS = {
    "ShardParams": "plan",
    "run_sharding": "sharding",
    "preview_sharding": "sharding",
    "read_manifest": "manifest",
    "ShardSet": "reader",
    "raw_samples": "reader",
    "decode_sample": "reader",
    "sample_key": "sample_format",
    "image_member": "sample_format",
    "label_members": "sample_format",
    "plan_array": "array",
    "shard_jobs": "array",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
