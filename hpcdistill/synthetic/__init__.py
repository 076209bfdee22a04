"""Synthetic H&E slides for the demo and the tests: the scene, written as true Aperio SVS or pyramidal TIFF files, and
labelled datasets of them."""

from hpcdistill.common.lazy_exports import lazy_exports

_EXPORTS = {"make_scene": "scene", "render_region": "scene", "write_slide": "dataset", "write_dataset": "dataset"}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
