"""What a synthetic slide and a synthetic dataset are, one object each: `SlideSpec` for `write_slide`, `DatasetSpec`
for `write_dataset` (its fields are the `hpcdistill synth` flags of the same names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hpcdistill.synthetic.scene import TILE


@dataclass(frozen=True)
class SlideSpec:
    """One slide file. fmt "svs": the Aperio layout (tiled level 0, stripped thumbnail, tiled /4 levels, label,
    macro); "tiff": a generic pyramidal tiled TIFF, one page per level, resolution tags in px/cm giving mpp."""

    width: int  # level-0 pixels
    height: int
    fmt: str = "svs"
    base_mag: float = 40
    mpp: float | None = None  # None: 10 / base_mag (40x -> 0.25 um/px)
    class_id: int = 0
    seed: int = 0
    tissues: int = 3  # tissue pieces on the slide
    tile: int = TILE
    jpeg: bool = True
    with_metadata: bool = True  # False: no AppMag/MPP and no resolution (XResolution=1, ResolutionUnit NONE)
    signal: float = 1.0  # class signal strength (0 = indistinguishable)
    pyramid: str = "render"  # render: every level drawn from the scene; scanner: each from the one above
    site: int = 0  # the staining site (synthetic.scene.site_stains): 0 the reference, others shifted


@dataclass(frozen=True)
class DatasetSpec:
    """Labelled slides per split, unlabelled aux1 (ADv1) and aux2 slides (ADv2 = aux1 + aux2), and their labels.csv.
    `size` is (width, height) of a 40x slide; 20x slides cover the same area with half the pixels."""

    slides_per_split: dict[str, int] = field(default_factory=lambda: {"train": 9, "val": 3, "test": 3})
    classes: tuple[str, ...] | int = 3  # a count (CLASS_NAMES[:n]) or the names
    aux1: int = 3
    aux2: int = 3
    size: tuple[int, int] = (4096, 3072)
    tissues: tuple[int, int] = (2, 4)  # min, max tissue pieces per slide
    signal: float = 1.0
    seed: int = 0
    jpeg: bool = True
    pyramid: str = "render"
    site: int = 0  # every slide stained at this site (synthetic.scene.site_stains)
    # A 40x slide's true microns per pixel (20x: twice it), the same scene at that pixel size; the header still says
    # AppMag 40 (20): a scanner whose pixels are not exactly 0.25 um. None: 10 / the magnification.
    pixel_um: float | None = None
