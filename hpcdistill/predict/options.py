"""What `predict` is asked for, checked against the model before any slide is read: the options, the scale and
stain the slides are read with (the model's, unless the flags say), and what the user is told first."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hpcdistill.common.console import say
from hpcdistill.common.errors import PredictionError
from hpcdistill.models.export import ExportedModel
from hpcdistill.scoring.aggregation import SLIDE_RULES
from hpcdistill.slides.mag_scale import MagScale
from hpcdistill.slides.regions import RoiOptions
from hpcdistill.slides.slide import READ_SOURCES
from hpcdistill.slides.tissue import TissueParams


@dataclass(frozen=True)
class PredictOptions:
    """How slides are read and what is written besides the calls."""

    base_mag: float | None = None
    mag_from: str | None = None  # slides.mag_scale's basis; None: what the model's shards used
    mpp_at_10x: float | None = None  # its reference pixel size; None: the model's
    stain_norm: str | None = None  # slides.stain's method; None: the model's (another is refused)
    tissue: TissueParams = field(default_factory=TissueParams)
    heatmap: bool = False  # CAM overlay PNG, arrays, and CAM cells as QuPath detections
    heatmap_class: str | None = None  # the class whose probability the overlay shows; None: the slide's call
    slide_rule: str = "mean"  # a key of SLIDE_RULES
    read: str | None = None  # "level0" or "pyramid" (slides.slide.READ_SOURCES); None: what the export trained on
    labels: str | None = None  # a labels CSV (slide, patient, label): score the calls (predict.cohort_scores)
    include_seen: bool = False  # score the labelled slides the model trained on too (left out by default)
    rois: RoiOptions = field(default_factory=RoiOptions)  # the user's regions (slides.regions), as in shard


def slide_scale(options: PredictOptions, exported: ExportedModel) -> MagScale:
    """What a magnification means when the slides are opened: the model's shards' scale, unless the flags say."""
    recorded = exported.mag_scale
    return MagScale(
        options.mag_from or recorded.basis, recorded.mpp_at_10x if options.mpp_at_10x is None else options.mpp_at_10x
    )


def announce(model_path: str | Path, exported: ExportedModel, options: PredictOptions) -> None:
    """What the user should know before the slides are read: a read other than the training source, an export
    older than the windowing record (said, not silently assumed)."""
    if options.read is not None and options.read != exported.source:  # allowed, but the input shifts: say so
        say(
            f"{model_path}: trained on crops from {exported.source} but reading {options.read}: the pixels differ from "
            "training (scanner filter and JPEG); see the README's pyramid section for the measured cost"
        )
    scale = slide_scale(options, exported)
    if scale != exported.mag_scale:  # allowed (e.g. to measure a scale error), but never silently
        say(
            f"{model_path}: its shards measured magnification by {exported.mag_scale.describe()}, these slides are "
            f"read by {scale.describe()}: windows of a slide whose two disagree are cut at another scale than in "
            "training"
        )
    if not exported.windowing_recorded:
        say(
            f"{model_path}: written before exports recorded their shards' windowing; tissues are cut with the "
            f"sharder's defaults ({exported.windowing.to_dict()})"
        )


def check_options(options: PredictOptions, exported: ExportedModel) -> PredictOptions:
    """The options, checked against each other and the model (one line for the first that does not fit)."""
    classes = exported.classes
    if options.stain_norm is not None and options.stain_norm != exported.stain_norm.method:
        raise PredictionError(
            f"--stain-norm {options.stain_norm}: the model was trained on shards with stain normalisation "
            f"{exported.stain_norm.method}; a model sees slides only as it was trained (leave the flag out: the "
            "model's is used)"
        )
    if options.slide_rule not in SLIDE_RULES:
        raise PredictionError(f"--slide-rule {options.slide_rule!r}: expected one of {', '.join(SLIDE_RULES)}")
    if options.read not in (None, *READ_SOURCES):
        raise PredictionError(f"--read {options.read!r}: expected one of {', '.join(READ_SOURCES)}")
    if options.heatmap_class is not None and options.heatmap_class not in classes:
        raise PredictionError(
            f"--heatmap-class {options.heatmap_class!r}: not a class of the model ({', '.join(classes)})"
        )
    return options
