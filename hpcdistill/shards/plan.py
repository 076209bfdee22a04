"""What a sharding run will do: its parameters (everything that changes the shards' bytes), the ordered per-slide
jobs with their splits and class ids, and the fingerprint a rerun into the same folder must match."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from hpcdistill.common.errors import RegionError, ShardingError
from hpcdistill.common.limits import read_bounded
from hpcdistill.common.mags import mag_name
from hpcdistill.slides import tissue
from hpcdistill.slides.catalog import LabelRow, assign_splits, read_labels_csv, slide_name
from hpcdistill.slides.mag_scale import PHYSICAL_SCALE, MagScale
from hpcdistill.slides.regions import RoiOptions
from hpcdistill.slides.slide import READ_SOURCES
from hpcdistill.slides.stain import StainNorm
from hpcdistill.slides.windows import DEFAULT_MAGS, DEFAULT_MAX_SIZE, Windowing


@dataclasses.dataclass(frozen=True)
class ShardParams:
    """Everything that changes the shards' bytes (and so must match when resuming into a folder)."""

    mags: tuple[float, ...] = DEFAULT_MAGS
    max_size: int = DEFAULT_MAX_SIZE
    image_format: str = "jpg"
    jpeg_quality: int = 90
    shard_size: int = 1_000_000_000
    shard_max_samples: int | None = None
    base_mag: float | None = None
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    # Class order (= the cls ids); None = the CSV's labels sorted. Clinical order reads better in reports.
    classes: tuple[str, ...] | None = None
    tissue: tissue.TissueParams = dataclasses.field(default_factory=tissue.TissueParams)
    # Where each magnification is cut from: "level0" (the paper: Lanczos from level 0) or "pyramid" (Lanczos from
    # the smallest level at or above it, the pixels a pyramid-reading prediction sees).
    source: str = "level0"
    # A patient of train/val/test/dev may also have slides in an aux (unlabelled) set: off, since distilling on a test
    # patient's other slides leaks the test set into training; allow it only for aux sets never scored against.
    aux_shares_patients: bool = False
    # The smallest side, in px at every cut magnification, a window may have: the smallest input of the network
    # the shards are for (the CLI probes it); a tissue with no window that large is skipped and counted.
    min_side: int = 1
    # The user's regions (QuPath GeoJSON): keep tissue inside them or remove it; with labels, they give each
    # tissue its class (slides/regions.py).
    rois: RoiOptions = dataclasses.field(default_factory=RoiOptions)
    # What a magnification means: a pixel size (the default; 10x = 1 um/px) or, as folders before the option were
    # cut, the objective power (slides.mag_scale).
    mag_scale: MagScale = PHYSICAL_SCALE
    # Stain normalisation to a reference, fitted per slide (slides.stain); none by default.
    stain: StainNorm = dataclasses.field(default_factory=StainNorm)

    def __post_init__(self) -> None:
        # floats everywhere, so params given by the CLI or by code fingerprint identically
        object.__setattr__(self, "mags", tuple(float(m) for m in self.mags))
        object.__setattr__(self, "split_ratios", tuple(float(r) for r in self.split_ratios))
        if self.base_mag is not None:
            object.__setattr__(self, "base_mag", float(self.base_mag))
        if self.source not in READ_SOURCES:
            raise ShardingError(f"--source {self.source!r}: must be one of {', '.join(READ_SOURCES)}")
        if self.image_format not in ("jpg", "png"):
            raise ShardingError(f"--format {self.image_format!r}: must be 'jpg' or 'png'")
        if not self.mags:
            raise ShardingError("--mags: at least one magnification is needed")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
            repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
            if not self.classes or repeated or not all(self.classes):
                raise ShardingError(
                    f"--classes {','.join(self.classes)!r}: needs distinct, non-empty names"
                    + (f" ({', '.join(repeated)} repeated)" if repeated else "")
                )
        if len(set(self.mags)) != len(self.mags):
            raise ShardingError(f"--mags {','.join(map(mag_name, self.mags))}: repeated magnification")
        if self.max_size < 1:
            raise ShardingError(f"--max-size {self.max_size}: must be positive")
        if not 1 <= self.jpeg_quality <= 100:
            raise ShardingError(f"--jpeg-quality {self.jpeg_quality}: must be in 1..100")
        if self.shard_size < 1 or (self.shard_max_samples is not None and self.shard_max_samples < 1):
            raise ShardingError("--shard-size / --shard-max-samples: must be positive")
        if len(self.split_ratios) != 3 or min(self.split_ratios) < 0 or sum(self.split_ratios) <= 0:
            raise ShardingError(f"--split-ratios {self.split_ratios}: need three non-negative numbers, not all zero")
        if self.rois.labels and self.classes is None:
            raise ShardingError("--roi-labels: name the classes the regions may carry with --classes")

    @property
    def windowing(self) -> Windowing:
        return Windowing(self.mags, self.max_size)


def parse_size(text: str | int) -> int:
    """'256MB' -> 256_000_000, '1GiB' -> 2**30, '4096' -> 4096 (bytes)."""
    units = {
        "": 1,
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "k": 2**10,
        "kib": 2**10,
        "m": 2**20,
        "mib": 2**20,
        "g": 2**30,
        "gib": 2**30,
    }
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in units:
        raise ShardingError(f"size {text!r}: expected bytes like '4096', '256MB' or '1GiB'")
    size = int(float(match.group(1)) * units[match.group(2).lower()])
    if size < 1:
        raise ShardingError(f"size {text!r}: must be at least 1 byte")
    return size


@dataclasses.dataclass(frozen=True)
class SlideJob:
    """One slide of the plan: where it goes and how it is labeled (class_id None = unlabeled)."""

    path: str
    slide: str
    patient: str
    label: str | None
    class_id: int | None
    split: str | None  # None: skipped before opening (reason set)
    skip_reason: str | None = None


def make_plan(
    slide_paths: list[Path], labels_csv: str | os.PathLike | None, params: ShardParams
) -> tuple[list[SlideJob], list[str]]:
    """The ordered jobs (sorted by slide name) and the class names."""
    if labels_csv is None:
        jobs = [SlideJob(str(p), slide_name(p), slide_name(p), None, None, "aux") for p in slide_paths]
        return jobs, []
    rows = read_labels_csv(labels_csv, slide_paths)
    classes = sorted({r.label for r in rows.values() if r.label})
    if params.classes is not None:
        unknown = [r for r in sorted(rows.values(), key=lambda r: r.line) if r.label and r.label not in params.classes]
        if unknown:
            raise ShardingError(
                f"{labels_csv}:{unknown[0].line}: label {unknown[0].label!r} is not in --classes "
                f"({', '.join(params.classes)})"
            )
        classes = list(params.classes)
    splits = assign_splits(rows.values(), params.split_ratios, params.seed)
    if not params.aux_shares_patients:
        check_aux_patients(labels_csv, rows.values(), splits)
    jobs = []
    for p in slide_paths:
        row = rows.get(p)
        if row is None:
            jobs.append(SlideJob(str(p), slide_name(p), slide_name(p), None, None, None, f"{p}: not in labels CSV"))
        else:
            jobs.append(
                SlideJob(
                    str(p),
                    row.slide,
                    row.patient,
                    row.label or None,
                    classes.index(row.label) if row.label else None,
                    splits[row.slide],
                )
            )
    return sorted(jobs, key=lambda j: j.slide), classes


def check_aux_patients(labels_csv: str | os.PathLike, rows: Iterable[LabelRow], splits: dict[str, str]) -> None:
    """A patient with slides in train/val/test/dev may not also be in an aux set (one line naming both slides)."""
    rows = list(rows)
    scored: dict[str, LabelRow] = {}
    for row in rows:
        if not splits[row.slide].startswith("aux"):
            scored.setdefault(row.patient, row)
    for row in sorted(rows, key=lambda r: r.line):
        other = scored.get(row.patient)
        if splits[row.slide].startswith("aux") and other is not None:
            raise ShardingError(
                f"{labels_csv}:{row.line}: patient {row.patient!r} has slide {row.slide} in {splits[row.slide]} and "
                f"{other.slide} in {splits[other.slide]}: an aux set would train on a scored patient; give the aux "
                "slide another patient, or pass --aux-shares-patients if that set is never scored against"
            )


def shard_inputs(slide_paths: list[Path], labels_csv: str | os.PathLike | None, params: ShardParams) -> list[Path]:
    """What a sharding run reads: its slides, labels CSV and each slide's region file (never removed by --overwrite;
    the other files of a --rois folder, e.g. shard's own QC images beside the outlines, are not inputs)."""
    regions = [params.rois.file_for(slide_name(p), p.name) for p in slide_paths]
    extra = [Path(p) for p in (labels_csv, *regions) if p is not None]
    return [*slide_paths, *extra]


def params_fingerprint(params: ShardParams, slide_paths: list[Path], labels_csv: str | os.PathLike | None) -> dict:
    """The parameters recorded in the journal and manifest; a rerun into the same folder must match them."""
    fingerprint = json.loads(json.dumps(dataclasses.asdict(params)))
    if fingerprint["source"] == "level0":
        del fingerprint["source"]  # the paper's source, and every folder's before the option: absent means level0
    if not fingerprint["aux_shares_patients"]:
        del fingerprint["aux_shares_patients"]  # the default: folders written before the option match
    if fingerprint["min_side"] == 1:
        del fingerprint["min_side"]  # every window has a side of 1 px: folders written before the option match
    if not params.stain.active:
        del fingerprint["stain"]  # none: folders written before the option match
    if params.mag_scale.basis == "objective":
        del fingerprint["mag_scale"]  # how folders were cut before the option: theirs match
    if params.rois.path is None:
        del fingerprint["rois"]  # no regions: folders written before the option match
    else:  # an edited region file changes the shards: a rerun into the folder must notice
        files = {p.name: params.rois.file_for(slide_name(p), p.name) for p in slide_paths}
        fingerprint["roi_files"] = {
            name: hashlib.sha256(read_bounded(f, "region_bytes", RegionError)).hexdigest()
            for name, f in files.items()
            if f is not None
        }
    fingerprint["slides"] = [p.name for p in slide_paths]
    if labels_csv is not None:
        fingerprint["labels_csv"] = Path(labels_csv).name
        data = read_bounded(labels_csv, "csv_bytes", ShardingError)
        fingerprint["labels_sha256"] = hashlib.sha256(data).hexdigest()
    else:
        fingerprint["labels_csv"] = None
    return fingerprint
