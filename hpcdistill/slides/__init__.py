"""Whole-slide images: the `Slide` interface, one backend per reader and the factory that picks one, what a file says
about itself, exact Lanczos resampling, tissue on a thumbnail, and tissue windows."""

from hpcdistill.common.lazy_exports import lazy_exports

_EXPORTS = {
    "Slide": "slide",
    "SlideInfo": "slide",
    "target_size": "slide",
    "open_slide": "factory",
    "base_magnification": "metadata",
    "lanczos_to_size": "resample",
    "TissueParams": "tissue",
    "find_tissues": "tissue",
    "Windowing": "windows",
    "find_windows": "windows",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
