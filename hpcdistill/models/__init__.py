"""The GroupNorm ResNets, the export format and its reader, and the one loop that runs a model over a stream of
tissues."""

from hpcdistill.common.lazy_exports import lazy_exports

_EXPORTS = {
    "build_model": "resnet",
    "ResNet": "resnet",
    "ExportedModel": "export",
    "load_exported": "export",
    "export_blob": "export",
    "model_outputs": "inference",
    "pick_device": "inference",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
