"""Cutting one slide: open it, check its magnification, find its tissue windows (with the QC image), read every
window at every magnification straight from level 0, encode, and append the payloads to the slide's spool file.
`shard --dry-run` runs the same survey without cutting (`preview_slide`)."""

from __future__ import annotations

import dataclasses
import errno
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from hpcdistill.common.errors import HpcdistillError, LabelConflict, one_line
from hpcdistill.common.files import atomic_write_json
from hpcdistill.common.mags import mag_name
from hpcdistill.common.output_folder import input_at
from hpcdistill.shards.plan import ShardParams, SlideJob
from hpcdistill.shards.sample_format import image_member, label_members, sample_key, sample_meta
from hpcdistill.slides import tissue
from hpcdistill.slides.factory import open_slide
from hpcdistill.slides.outlines import feature, tissue_outlines
from hpcdistill.slides.regions import label_tissues
from hpcdistill.slides.tissue import class_colour
from hpcdistill.slides.windows import Box, TissueWindows, find_windows, fitting_windows, window_sizes

SPOOL = ".spool"  # per-slide encoded samples between a worker and the writer


@dataclasses.dataclass
class Sample:
    key: str
    files: list[tuple[str, int, int]]  # (extension, offset, length) of each payload in the slide's spool file
    sizes: dict[str, list[int]]  # mag name -> [w, h]
    tissue: int
    label: str | None = None  # its class: the slide's, or its tissue's region's (--roi-labels)


@dataclasses.dataclass
class SlideResult:
    slide: str
    status: str  # "ok" | "skipped"
    reason: str | None
    split: str | None
    base_mag: float | None = None
    mag_source: str | None = None
    mpp: float | None = None  # microns per level-0 pixel, as the slide records it (None: it records none)
    stain_fit: tuple[float, ...] | None = None  # the slide's own stain (slides.stain), with --stain-norm
    tissues: int = 0
    small_tissues: int = 0  # tissues with no window of ShardParams.min_side at every magnification: not cut
    roi: str | None = None  # the region file applied, or why none was
    samples: list[Sample] = dataclasses.field(default_factory=list)
    spool: str | None = None  # encoded payloads, appended as cut: memory holds one window, not a whole slide
    # per mag name: [sum r,g,b, sumsq r,g,b, pixel count]; only for the labeled train split
    pixel_sums: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def record(self, job: SlideJob) -> dict[str, Any]:
        """The per-slide entry kept in the journal and the manifest."""
        return {
            "status": self.status,
            "reason": self.reason,
            "split": self.split,
            "patient": job.patient,
            "label": job.label,
            "file": Path(job.path).name,
            "tissues": self.tissues,
            "small_tissues": self.small_tissues,
            "roi": self.roi,
            "sample_labels": [s.label for s in self.samples],
            "samples": len(self.samples),
            "base_mag": self.base_mag,
            "mag_source": self.mag_source,
            "mpp": self.mpp,
            "stain": None if self.stain_fit is None else [round(v, 6) for v in self.stain_fit],
            "sample_tissues": sorted({s.tissue for s in self.samples}),
            "sizes": [s.sizes for s in self.samples],
            "pixel_sums": self.pixel_sums,
        }


def shard_slide(job: SlideJob, params: ShardParams, out: str, collect_stats: bool, spool_dir: str) -> SlideResult:
    """Open one slide, find its tissue, cut and encode every window at every mag into `spool_dir`/<slide>.bin (its QC
    image into `out`/qc).

    Never raises for a bad slide (only for a full disk): the result is then 'skipped' with a one-line reason.
    """
    if job.skip_reason:
        return SlideResult(job.slide, "skipped", job.skip_reason, job.split)
    spool = Path(spool_dir) / f"{job.slide}.bin"
    try:
        with open(spool, "wb") as handle:
            result = _shard_slide_or_skip(job, params, Path(out) / "qc", collect_stats, handle)
        if result.samples:
            result.spool = str(spool)
        else:
            spool.unlink()
        return result
    except BaseException:
        spool.unlink(missing_ok=True)
        raise


def _shard_slide_or_skip(
    job: SlideJob, params: ShardParams, qc_dir: Path, collect_stats: bool, spool: io.BufferedWriter
) -> SlideResult:
    try:
        return _shard_open_slide(job, params, qc_dir, collect_stats, spool)
    except LabelConflict:
        raise  # the user's labels contradict each other: refused, not a bad slide to skip
    except Exception as exc:  # noqa: BLE001 -- a decoder error in one bad file must not stop the other slides
        return SlideResult(job.slide, "skipped", _skip_reason(exc, job.path), job.split)


def _skip_reason(exc: Exception, path: str) -> str:
    """One line on why a slide is skipped; a full output disk is not the slide's fault and stops the run."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        raise exc
    if os.strerror(errno.ENOSPC) in str(exc):  # libvips reports a full disk as its own error type, with this text
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
    line = one_line(exc if isinstance(exc, HpcdistillError) else f"{exc.__class__.__name__}: {exc}")
    return line if path in line else f"{path}: {line}"


def _shard_open_slide(
    job: SlideJob, params: ShardParams, qc_dir: Path, collect_stats: bool, spool: io.BufferedWriter
) -> SlideResult:
    with open_slide(job.path, base_mag=params.base_mag, scale=params.mag_scale) as slide:
        info = slide.info
        result = SlideResult(job.slide, "ok", None, job.split, info.base_mag, info.mag_source, info.mpp)
        found, reason = survey_slide(slide, job, params, qc_dir)
        result.roi = region_note(job, params)
        if reason:
            return _skip(result, reason)
        result.tissues, result.small_tissues = len(found.boxes), found.small
        if params.stain.active:  # fitted once on the slide's tissue: every window of it mapped alike
            result.stain_fit = params.stain.fit_slide(found.thumb, found.mask(), job.path)
        for t, windows in enumerate(found.windows):
            label = found.classes[t] if found.classes is not None else job.label
            for w, window in enumerate(windows):
                sample = _cut_sample(slide, job, t, w, window, params, result, collect_stats, spool, label)
                result.samples.append(sample)
        return result


def survey_slide(
    slide: Any, job: SlideJob, params: ShardParams, qc_dir: str | Path
) -> tuple[TissueWindows | None, str | None]:
    """The slide's tissue windows, with its QC thumbnail written; or why it is skipped. Sharding and its dry run
    both go through here, so the preview counts exactly what sharding cuts."""
    info = slide.info
    too_high = [m for m in params.mags if m > info.base_mag + 1e-9]
    if too_high:
        return None, (
            f"{job.path}: magnification {mag_name(max(too_high))} is above the slide's base magnification "
            f"{mag_name(info.base_mag)} ({info.mag_source})"
        )
    regions = params.rois.regions_for(job.path, job.slide)  # raises for a slide skipped for lack of regions
    found = find_windows(slide, params.tissue, params.windowing, regions, params.rois.mode)
    if params.rois.labels and regions is not None:
        found = label_tissues(found, regions, list(params.classes or ()))
    found = fitting_windows(found, info.base_mag, params.mags, params.min_side)
    names = [f"t{i:03d}" for i in range(len(found.boxes))]
    tissue.write_qc_png(
        Path(qc_dir) / f"{job.slide}.png",
        found.thumb,
        found.boxes,
        found.scale,
        labels=names,
        title=f"{job.slide}: {len(found.boxes)} tissues, {found.count} windows "
        f"(base {mag_name(info.base_mag)}, split {job.split or '-'})",
        legend=[(name, tissue.QC_PALETTE[i % len(tissue.QC_PALETTE)]) for i, name in enumerate(names)],
    )
    write_outlines(Path(qc_dir) / f"{job.slide}.geojson", slide, found, params, job.label)
    if found.boxes:
        return found, None
    if found.small:
        return found, (
            f"{job.path}: its {found.small} tissue(s) are all under --min-side {params.min_side} px at "
            f"{mag_name(min(params.mags))} (the smallest input of the network)"
        )
    return found, f"{job.path}: no tissue found on the thumbnail"


def region_note(job: SlideJob, params: ShardParams) -> str | None:
    """What the slide's record says about regions: the file applied, or that its detected tissue was used."""
    if params.rois.path is None:
        return None
    path = params.rois.file_for(job.slide, Path(job.path).name)
    return f"{path.name} ({params.rois.mode})" if path else f"none ({params.rois.missing})"


def write_outlines(path: Path, slide: Any, found: TissueWindows, params: ShardParams, label: str | None) -> None:
    """The slide's tissues (regions applied) as QuPath annotations named t000, t001, ...: edit them in QuPath and
    shard again with --rois to use the edited outlines (into the same folder: the edited files are then inputs, and
    are neither removed nor replaced)."""
    if params.rois.path is not None and input_at(path, [params.rois.path]) is not None:
        return  # the region file this run reads (qc/ edited in QuPath and given back as --rois): it stays as edited
    shapes = tissue_outlines(slide, found, params.tissue)
    names = [found.classes[t] if found.classes is not None else label for t in range(len(shapes))]
    ids = {c: i for i, c in enumerate(params.classes or sorted({n for n in names if n}))}
    features = [
        feature(shape, f"t{t:03d}", classification=name, colour=class_colour(ids.get(name, 0)) if name else None)
        for t, (shape, name) in enumerate(zip(shapes, names))
    ]
    atomic_write_json(path, {"type": "FeatureCollection", "features": features})


def preview_slide(job: SlideJob, params: ShardParams, qc_dir: str) -> dict[str, Any]:
    """`shard --dry-run` for one slide: what sharding would find, with its QC PNG; never raises for a bad slide."""
    row: dict[str, Any] = {
        "slide": job.slide,
        "path": job.path,
        "patient": job.patient,
        "label": job.label,
        "split": job.split,
        "status": "skipped",
        "reason": job.skip_reason,
    }
    if job.skip_reason:
        return row
    try:
        with open_slide(job.path, base_mag=params.base_mag, scale=params.mag_scale) as slide:
            info = slide.info
            row.update(
                base_mag=info.base_mag,
                mag_source=info.mag_source,
                mpp=info.mpp,
                size=[info.width, info.height],
                vendor=info.vendor,
            )
            found, row["reason"] = survey_slide(slide, job, params, qc_dir)
            if found is not None:
                row.update(
                    tissues=len(found.boxes), small_tissues=found.small, samples=found.count, tissue_area=found.area
                )
    except Exception as exc:  # noqa: BLE001 -- as in sharding: one bad file is reported, the others go on
        row["reason"] = _skip_reason(exc, job.path)
    row["status"] = "skipped" if row["reason"] else "ok"
    return row


def _skip(result: SlideResult, reason: str) -> SlideResult:
    result.status, result.reason, result.tissues, result.samples = "skipped", reason, 0, []
    return result


def _add_pixel_sums(sums: list[float], pixels: np.ndarray) -> None:
    """Per-channel sum and sum of squares (on [0, 1]) and the pixel count: the manifest's mean/std merge exactly."""
    flat = pixels.reshape(-1, 3)
    channel_sum = flat.sum(axis=0, dtype=np.int64)
    channel_sq = np.einsum("ij,ij->j", flat.astype(np.int64), flat.astype(np.int64))
    for c in range(3):
        sums[c] += float(channel_sum[c]) / 255.0
        sums[3 + c] += float(channel_sq[c]) / 65025.0
    sums[6] += flat.shape[0]


def _cut_sample(
    slide: Any,
    job: SlideJob,
    t: int,
    w: int,
    box: Box,
    params: ShardParams,
    result: SlideResult,
    collect_stats: bool,
    spool: io.BufferedWriter,
    label: str | None,
) -> Sample:
    base_mag = slide.info.base_mag
    ext = params.image_format
    payloads: list[tuple[str, bytes]] = []
    sizes: dict[str, list[int]] = {}
    wanted = window_sizes(box, base_mag, params.mags)
    images = slide.read_at_mags(
        box, wanted, params.source
    )  # level 0 decoded once; each mag Lanczos-resampled straight from it
    for mag in params.mags:
        pixels = params.stain.apply(images.pop(mag), result.stain_fit) if result.stain_fit else images.pop(mag)
        sizes[mag_name(mag)] = [int(v) for v in wanted[mag]]
        if collect_stats:
            _add_pixel_sums(result.pixel_sums.setdefault(mag_name(mag), [0.0] * 7), pixels)
        payloads.append(image_member(mag, pixels, ext, params.jpeg_quality))
        del pixels
    meta = sample_meta(
        slide=job.slide,
        patient=job.patient,
        tissue=t,
        window=w,
        box_l0=box,
        base_mag=base_mag,
        mpp=slide.info.mpp,
        sizes=sizes,
        label=label,
        split=job.split,
    )
    class_id = job.class_id if label == job.label else list(params.classes or ()).index(label)
    payloads += label_members(class_id, meta)
    files = []
    for ext, data in payloads:
        files.append((ext, spool.tell(), len(data)))
        spool.write(data)
    return Sample(sample_key(job.slide, t, w), files, sizes, t, label)
