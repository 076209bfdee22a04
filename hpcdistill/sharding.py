"""Slides -> aligned multi-magnification WebDataset shards: the plan, the per-slide work, atomic resumable writing, the manifest.

Flow: collect slide files -> read the labels CSV -> assign splits (the plan) -> per slide, in worker processes:
open, find tissue, cut every window at every magnification straight from level 0, encode, append to a per-slide
spool file -> the main process consumes results in plan order and streams them into `{split}-{NNNNNN}.tar`
(written as `.name.tmp`, renamed when complete), journalling each completed shard, then writes the manifest.
Memory holds one window's pixels per worker, whatever the slide or shard size.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import csv
import dataclasses
import errno
import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import tarfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

import hpcdistill
from hpcdistill import slides, tissue
from hpcdistill.errors import HpcdistillError
from hpcdistill.mags import mag_name

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu")
SPLIT_NAME = re.compile(r"^(train|val|test|dev|aux|aux[A-Za-z0-9_]+)$")
RATIO_SPLITS = ("train", "val", "test")
JOURNAL = ".progress.json"
SPOOL = ".spool"  # per-slide encoded samples between a worker and the writer
MANIFEST = "manifest.json"
REF_MAG = 10.0  # --max-size and size rounding are expressed in 10x (teacher) pixels
_TAR_BLOCK = 512
_TAR_END = 2 * _TAR_BLOCK


class ShardingError(HpcdistillError):
    """A bad input or output folder for `hpcdistill shard`; one line naming the file and the reason."""


@dataclasses.dataclass(frozen=True)
class ShardParams:
    """Everything that changes the shards' bytes (and so must match when resuming into a folder)."""

    mags: tuple[float, ...] = (10.0, 5.0, 2.5, 1.25, 0.625)
    max_size: int = 8192
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

    def __post_init__(self) -> None:
        # floats everywhere, so params given by the CLI or by code fingerprint identically
        object.__setattr__(self, "mags", tuple(float(m) for m in self.mags))
        object.__setattr__(self, "split_ratios", tuple(float(r) for r in self.split_ratios))
        if self.base_mag is not None:
            object.__setattr__(self, "base_mag", float(self.base_mag))
        if self.image_format not in ("jpg", "png"):
            raise ShardingError(f"--format {self.image_format!r}: must be 'jpg' or 'png'")
        if not self.mags:
            raise ShardingError("--mags: at least one magnification is needed")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
            repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
            if not self.classes or repeated or not all(self.classes):
                raise ShardingError(f"--classes {','.join(self.classes)!r}: needs distinct, non-empty names"
                                    + (f" ({', '.join(repeated)} repeated)" if repeated else ""))
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


def parse_size(text: str | int) -> int:
    """'256MB' -> 256_000_000, '1GiB' -> 2**30, '4096' -> 4096 (bytes)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in units:
        raise ShardingError(f"size {text!r}: expected bytes like '4096', '256MB' or '1GiB'")
    size = int(float(match.group(1)) * units[match.group(2).lower()])
    if size < 1:
        raise ShardingError(f"size {text!r}: must be at least 1 byte")
    return size


# ----------------------------------------------------------------------------------------------------------- inputs

def collect_slides(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, directories scanned recursively for known slide extensions, globs expanded; sorted, unique."""
    found: set[Path] = set()
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
        elif path.is_file():
            found.add(path)
        elif glob.has_magic(text):
            matches = [Path(p) for p in glob.glob(text, recursive=True)]
            files = [p for p in matches if p.is_file()]
            for p in matches:
                if p.is_dir():
                    files.extend(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SLIDE_EXTENSIONS)
            if not files:
                raise ShardingError(f"{text}: the pattern matches no files")
            found.update(files)
        else:
            raise ShardingError(f"{text}: no such file or directory")
    paths = sorted({p.resolve() for p in found})
    if not paths:
        raise ShardingError(f"{', '.join(map(str, inputs)) or '(no inputs)'}: no slide files found")
    names: dict[str, Path] = {}
    for p in paths:
        if slide_name(p) in names:
            raise ShardingError(f"{p}: same slide name {slide_name(p)!r} as {names[slide_name(p)]}; rename one")
        names[slide_name(p)] = p
    return paths


def slide_name(path: Path) -> str:
    """The slide's id in keys, labels and the manifest: its file name without the extension."""
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def sample_key(slide: str, tissue_index: int, window: int) -> str:
    """WebDataset splits file names at the first dot, so keys keep only [A-Za-z0-9_-]."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', slide)}_t{tissue_index:03d}_w{window:03d}"


@dataclasses.dataclass(frozen=True)
class LabelRow:
    slide: str
    patient: str
    label: str  # "" = unlabeled
    split: str  # "" = to be assigned
    line: int
    path: Path  # the slide file it matched


def read_labels_csv(csv_path: str | os.PathLike, slide_paths: list[Path]) -> dict[Path, LabelRow]:
    """Parse `slide,patient,label,split` (patient, label, split optional) and match rows to the slide files."""
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ShardingError(f"{csv_path}: cannot read labels CSV ({exc.__class__.__name__}: {exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "slide" not in columns:
        raise ShardingError(f"{csv_path}:1: header must have a 'slide' column (slide,patient,label,split)")
    if "label" not in columns:  # else every slide would silently become unlabeled
        raise ShardingError(f"{csv_path}:1: no 'label' column (columns: {', '.join(columns)}); add one (an empty "
                            "label marks an unlabeled slide), or shard without --labels to treat every slide as "
                            "unlabeled (split aux)")
    reader.fieldnames = columns
    lookup: dict[str, Path] = {}
    for p in slide_paths:
        for name in (p.name, slide_name(p), str(p)):
            lookup.setdefault(name, p)
    rows: dict[Path, LabelRow] = {}
    first_line: dict[Path, int] = {}
    for record in reader:
        line = reader.line_num
        values = {k: (v or "").strip() for k, v in record.items() if k is not None}
        if not any(values.values()):
            continue
        slide = values.get("slide", "")
        if not slide:
            raise ShardingError(f"{csv_path}:{line}: empty slide name")
        path = lookup.get(slide) or lookup.get(str((csv_path.parent / slide).resolve()))
        if path is None:
            raise ShardingError(f"{csv_path}:{line}: unknown slide {slide!r} (not among the input slide files)")
        if path in rows:
            raise ShardingError(f"{csv_path}:{line}: duplicate row for slide {slide!r} (first at line {first_line[path]})")
        split = values.get("split", "")
        if split and not SPLIT_NAME.match(split):
            raise ShardingError(f"{csv_path}:{line}: unknown split {split!r} (allowed: train, val, test, dev, aux, aux<name>)")
        rows[path] = LabelRow(slide_name(path), values.get("patient", "") or slide_name(path), values.get("label", ""),
                              split, line, path)
        first_line[path] = line
    explicit: dict[str, LabelRow] = {}  # aux may share patients; train/val/test/dev may not (leakage)
    for row in sorted(rows.values(), key=lambda r: r.line):
        if row.split and not row.split.startswith("aux"):
            other = explicit.setdefault(row.patient, row)
            if other.split != row.split:
                raise ShardingError(f"{csv_path}:{row.line}: patient {row.patient!r} in split {row.split!r} "
                                    f"but in {other.split!r} at line {other.line}")
    return rows


def assign_splits(rows: Iterable[LabelRow], ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """slide -> split. Explicit splits win; unlabeled -> aux; the rest split at patient level, stratified by class."""
    rows = sorted(rows, key=lambda r: r.slide)
    patient_split = {r.patient: r.split for r in rows if r.split and r.label}
    patient_class: dict[str, str] = {}
    for r in rows:
        if r.label and not r.split and r.patient not in patient_split:
            patient_class.setdefault(r.patient, r.label)  # a patient's first slide decides its stratum
    rng = random.Random(seed)
    total = sum(ratios)
    for label in sorted(set(patient_class.values())):
        patients = sorted(p for p, c in patient_class.items() if c == label)
        rng.shuffle(patients)
        n_val = round(len(patients) * ratios[1] / total)
        n_test = round(len(patients) * ratios[2] / total)
        n_train = max(0, len(patients) - n_val - n_test)
        for i, patient in enumerate(patients):
            patient_split[patient] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return {r.slide: r.split or (patient_split[r.patient] if r.label else "aux") for r in rows}


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


def make_plan(slide_paths: list[Path], labels_csv: str | os.PathLike | None,
              params: ShardParams) -> tuple[list[SlideJob], list[str]]:
    """The ordered jobs (sorted by slide name) and the class names."""
    if labels_csv is None:
        jobs = [SlideJob(str(p), slide_name(p), slide_name(p), None, None, "aux") for p in slide_paths]
        return jobs, []
    rows = read_labels_csv(labels_csv, slide_paths)
    classes = sorted({r.label for r in rows.values() if r.label})
    if params.classes is not None:
        unknown = [r for r in sorted(rows.values(), key=lambda r: r.line) if r.label and r.label not in params.classes]
        if unknown:
            raise ShardingError(f"{labels_csv}:{unknown[0].line}: label {unknown[0].label!r} is not in --classes "
                                f"({', '.join(params.classes)})")
        classes = list(params.classes)
    splits = assign_splits(rows.values(), params.split_ratios, params.seed)
    jobs = []
    for p in slide_paths:
        row = rows.get(p)
        if row is None:
            jobs.append(SlideJob(str(p), slide_name(p), slide_name(p), None, None, None, f"{p}: not in labels CSV"))
        else:
            jobs.append(SlideJob(str(p), row.slide, row.patient, row.label or None,
                                 classes.index(row.label) if row.label else None, splits[row.slide]))
    return sorted(jobs, key=lambda j: j.slide), classes


# ------------------------------------------------------------------------------------------------- per-slide work

@dataclasses.dataclass
class Sample:
    key: str
    files: list[tuple[str, int, int]]  # (extension, offset, length) of each payload in the slide's spool file
    sizes: dict[str, list[int]]  # mag name -> [w, h]
    tissue: int


@dataclasses.dataclass
class SlideResult:
    slide: str
    status: str  # "ok" | "skipped"
    reason: str | None
    split: str | None
    base_mag: float | None = None
    mag_source: str | None = None
    tissues: int = 0
    samples: list[Sample] = dataclasses.field(default_factory=list)
    spool: str | None = None  # encoded payloads, appended as cut: memory holds one window, not a whole slide
    # per mag name: [sum r,g,b, sumsq r,g,b, pixel count]; only for the labeled train split
    pixel_sums: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def record(self, job: SlideJob) -> dict[str, Any]:
        """The per-slide entry kept in the journal and the manifest."""
        return {"status": self.status, "reason": self.reason, "split": self.split, "patient": job.patient,
                "label": job.label, "file": Path(job.path).name, "tissues": self.tissues,
                "samples": len(self.samples), "base_mag": self.base_mag, "mag_source": self.mag_source,
                "sample_tissues": sorted({s.tissue for s in self.samples}),
                "sizes": [s.sizes for s in self.samples], "pixel_sums": self.pixel_sums}


def window_alignment(base_mag: float, mags: Iterable[float]) -> int:
    """Smallest level-0 step that maps to whole pixels at every mag (64 for 40x base down to 0.625x)."""
    step = 1
    for mag in mags:
        denominator = (Fraction(mag).limit_denominator(10_000) / Fraction(base_mag).limit_denominator(10_000)).denominator
        step = step * denominator // math.gcd(step, denominator)
    return step if step <= 4096 else max(1, round(base_mag / min(mags)))


def split_windows(box: tuple[int, int, int, int], slide_wh: tuple[int, int], base_mag: float,
                  params: ShardParams) -> list[tuple[int, int, int, int]]:
    """Level-0 windows covering a tissue box, each at most --max-size 10x px a side.

    A box that fits is one window, itself. A larger one is covered by equal windows whose sides are multiples of
    the alignment step, so every window has whole-pixel sizes at all mags; the covered span is centred on the box.
    """
    x, y, w, h = box
    align = window_alignment(base_mag, params.mags)
    limit_l0 = max(align, int(params.max_size * base_mag / REF_MAG) // align * align)
    if w <= limit_l0 and h <= limit_l0:
        return [box]

    def axis(start: int, length: int, extent: int) -> list[tuple[int, int]]:
        count = math.ceil(length / limit_l0)
        step = math.ceil(length / count / align) * align
        span = count * step
        origin = min(max(0, start - (span - length) // 2), max(0, extent - span))
        return [(origin + i * step, min(step, extent - origin - i * step)) for i in range(count)
                if origin + i * step < extent]

    return [(wx, wy, ww, wh) for wy, wh in axis(y, h, slide_wh[1]) for wx, ww in axis(x, w, slide_wh[0])]


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def shard_slide(job: SlideJob, params: ShardParams, out: str, collect_stats: bool) -> SlideResult:
    """Open one slide, find its tissue, cut and encode every window at every mag into `out`/.spool/<slide>.

    Never raises for a bad slide (only for a full disk): the result is then 'skipped' with a one-line reason.
    """
    if job.skip_reason:
        return SlideResult(job.slide, "skipped", job.skip_reason, job.split)
    spool = Path(out) / SPOOL / f"{job.slide}.bin"
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


def _shard_slide_or_skip(job: SlideJob, params: ShardParams, qc_dir: Path, collect_stats: bool,
                         spool: io.BufferedWriter) -> SlideResult:
    try:
        return _shard_open_slide(job, params, qc_dir, collect_stats, spool)
    except Exception as exc:  # noqa: BLE001 -- a decoder error in one bad file must not stop the other slides
        return SlideResult(job.slide, "skipped", _skip_reason(exc, job.path), job.split)


def _skip_reason(exc: Exception, path: str) -> str:
    """One line on why a slide is skipped; a full output disk is not the slide's fault and stops the run."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        raise exc
    if os.strerror(errno.ENOSPC) in str(exc):  # libvips reports a full disk as its own error type, with this text
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
    return _one_line(str(exc) if isinstance(exc, HpcdistillError) else f"{exc.__class__.__name__}: {exc}", path)


def _one_line(message: str, path: str) -> str:
    line = " ".join(message.split())
    return line if path in line else f"{path}: {line}"


def _shard_open_slide(job: SlideJob, params: ShardParams, qc_dir: Path, collect_stats: bool,
                      spool: io.BufferedWriter) -> SlideResult:
    with slides.open_slide(job.path, base_mag=params.base_mag) as slide:
        info = slide.info
        result = SlideResult(job.slide, "ok", None, job.split, info.base_mag, info.mag_source)
        reason = _mag_skip_reason(job, info, params)
        if reason:
            return _skip(result, reason)
        boxes = _tissue_with_qc(slide, job, params, qc_dir)
        if not boxes:
            return _skip(result, f"{job.path}: no tissue found on the thumbnail")
        result.tissues = len(boxes)
        for t, box in enumerate(boxes):
            for w, window in enumerate(split_windows(box, (info.width, info.height), info.base_mag, params)):
                result.samples.append(_cut_sample(slide, job, t, w, window, params, result, collect_stats, spool))
        return result


def _mag_skip_reason(job: SlideJob, info: slides.SlideInfo, params: ShardParams) -> str | None:
    too_high = [m for m in params.mags if m > info.base_mag + 1e-9]
    if too_high:
        return (f"{job.path}: magnification {mag_name(max(too_high))} is above the slide's base magnification "
                f"{mag_name(info.base_mag)} ({info.mag_source})")
    return None


def _tissue_with_qc(slide: Any, job: SlideJob, params: ShardParams, qc_dir: str | Path) -> list[tuple[int, int, int, int]]:
    """The tissue boxes of a slide, and its QC thumbnail with them drawn."""
    info = slide.info
    thumb, scale = slide.thumbnail(params.tissue.thumb_size)
    boxes = tissue.find_tissue_boxes(thumb, scale, params.tissue, slide_size=(info.width, info.height))
    tissue.write_qc_png(Path(qc_dir) / f"{job.slide}.png", thumb, boxes, scale,
                        labels=[f"t{i:03d}" for i in range(len(boxes))])
    return boxes


def preview_slide(job: SlideJob, params: ShardParams, qc_dir: str) -> dict[str, Any]:
    """`shard --dry-run` for one slide: what sharding would find, with its QC PNG; never raises for a bad slide."""
    row: dict[str, Any] = {"slide": job.slide, "path": job.path, "patient": job.patient, "label": job.label,
                           "split": job.split, "status": "skipped", "reason": job.skip_reason}
    if job.skip_reason:
        return row
    try:
        with slides.open_slide(job.path, base_mag=params.base_mag) as slide:
            info = slide.info
            row.update(base_mag=info.base_mag, mag_source=info.mag_source, size=[info.width, info.height],
                       vendor=info.vendor)
            row["reason"] = _mag_skip_reason(job, info, params)
            if row["reason"] is None:
                boxes = _tissue_with_qc(slide, job, params, qc_dir)
                windows = [split_windows(box, (info.width, info.height), info.base_mag, params) for box in boxes]
                row.update(tissues=len(boxes), samples=sum(map(len, windows)))
                row["reason"] = None if boxes else f"{job.path}: no tissue found on the thumbnail"
    except Exception as exc:  # noqa: BLE001 -- as in sharding: one bad file is reported, the others go on
        row["reason"] = _skip_reason(exc, job.path)
    row["status"] = "skipped" if row["reason"] else "ok"
    return row


def preview_sharding(inputs: Iterable[str | os.PathLike], out: str | os.PathLike, *, labels_csv: str | None = None,
                     params: ShardParams | None = None, workers: int = 1) -> dict[str, Any]:
    """What `shard` would cut, without cutting: per slide its split, label, base magnification, tissues and samples
    (or why it would be skipped), per split the counts. Writes only `out`/qc/*.png and `out`/plan.json, so tissue
    parameters can be checked on the QC images before a long run; a later `shard` into `out` is unaffected."""
    params = params or ShardParams()
    out = Path(out)
    jobs, classes = make_plan(collect_slides(inputs), labels_csv, params)
    create_output_folder(out)
    (out / "qc").mkdir(exist_ok=True)
    if workers > 1:
        context = multiprocessing.get_context("spawn")  # as in run_sharding: fork + libvips threads can deadlock
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            rows = list(pool.map(preview_slide, jobs, [params] * len(jobs), [str(out / "qc")] * len(jobs)))
    else:
        rows = [preview_slide(job, params, str(out / "qc")) for job in jobs]
    splits: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        entry = splits.setdefault(row["split"], {"slides": 0, "patients": set(), "tissues": 0, "samples": 0,
                                                 "class_slides": {c: 0 for c in classes}})
        entry["slides"] += 1
        entry["patients"].add(row["patient"])
        entry["tissues"] += row["tissues"]
        entry["samples"] += row["samples"]
        if row["label"]:
            entry["class_slides"][row["label"]] += 1
    for entry in splits.values():
        entry["patients"] = len(entry["patients"])
    plan = {"tool": "hpcdistill", "version": hpcdistill.__version__, "classes": classes,
            "mags": [float(m) for m in params.mags], "splits": dict(sorted(splits.items())), "slides": rows}
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    return plan


def _skip(result: SlideResult, reason: str) -> SlideResult:
    result.status, result.reason, result.tissues, result.samples = "skipped", reason, 0, []
    return result


def _cut_sample(slide: Any, job: SlideJob, t: int, w: int, box: tuple[int, int, int, int], params: ShardParams,
                result: SlideResult, collect_stats: bool, spool: io.BufferedWriter) -> Sample:
    base_mag = slide.info.base_mag
    ext = params.image_format
    payloads: list[tuple[str, bytes]] = []
    sizes: dict[str, list[int]] = {}
    wanted = {mag: slides.target_size((box[2], box[3]), base_mag, mag, ref_mag=REF_MAG) for mag in params.mags}
    images = slide.read_at_mags(box, wanted)  # level 0 decoded once; each mag Lanczos-resampled straight from it
    for mag in params.mags:
        pixels = images.pop(mag)
        sizes[mag_name(mag)] = [int(v) for v in wanted[mag]]
        if collect_stats:
            flat = pixels.reshape(-1, 3)
            sums = result.pixel_sums.setdefault(mag_name(mag), [0.0] * 7)
            channel_sum = flat.sum(axis=0, dtype=np.int64)
            channel_sq = np.einsum("ij,ij->j", flat.astype(np.int64), flat.astype(np.int64))
            for c in range(3):
                sums[c] += float(channel_sum[c]) / 255.0
                sums[3 + c] += float(channel_sq[c]) / 65025.0
            sums[6] += flat.shape[0]
        payloads.append((f"{mag_name(mag)}.{ext}", encode_image(pixels, ext, params.jpeg_quality)))
        del pixels
    meta = {"slide": job.slide, "patient": job.patient, "tissue": t, "window": w, "box_l0": list(map(int, box)),
            "base_mag": float(base_mag), "mpp": slide.info.mpp, "sizes": sizes, "label": job.label, "split": job.split}
    if job.class_id is not None:
        payloads.append(("cls", str(job.class_id).encode("ascii")))
    payloads.append(("json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")))
    files = []
    for ext, data in payloads:
        files.append((ext, spool.tell(), len(data)))
        spool.write(data)
    return Sample(sample_key(job.slide, t, w), files, sizes, t)


# ------------------------------------------------------------------------------------------- atomic shard writing

def _tar_member_size(payload_len: int) -> int:
    return _TAR_BLOCK + math.ceil(payload_len / _TAR_BLOCK) * _TAR_BLOCK


def _tar_file_size(members_bytes: int) -> int:
    """tarfile ends an archive with two zero blocks and pads it to whole 10240-byte records."""
    return math.ceil((members_bytes + _TAR_END) / tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def sample_tar_size(sample: Sample) -> int:
    return sum(_tar_member_size(length) for _, _, length in sample.files)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `.{name}.tmp`, fsync, rename over `path`: readers see the old file or the whole new one, never a part."""
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def append_sample(archive: tarfile.TarFile, key: str, payloads: list[tuple[str, bytes]]) -> None:
    """One sample as tar members with fixed mtime/uid/gid/names/mode, so equal inputs give equal bytes."""
    for ext, data in payloads:
        member = tarfile.TarInfo(f"{key}.{ext}")
        member.size, member.mtime, member.mode = len(data), 0, 0o644
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        archive.addfile(member, io.BytesIO(data))


class _OpenShard:
    """A shard being written straight to `.{name}.tmp` (so memory holds one sample); renamed when complete."""

    def __init__(self, out: Path, split: str, index: int):
        self.split, self.name = split, f"{split}-{index:06d}.tar"
        self.path = out / self.name
        self.keys: list[str] = []
        self.nbytes = 0  # tar member bytes so far
        self.slides_ending_here: list[str] = []
        self._handle = open(_tmp_path(self.path), "wb")
        self._archive = tarfile.open(fileobj=self._handle, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, sample: Sample, spool: io.BufferedReader) -> None:
        payloads = []
        for ext, offset, length in sample.files:
            spool.seek(offset)
            payloads.append((ext, spool.read(length)))
        append_sample(self._archive, sample.key, payloads)
        self.keys.append(sample.key)
        self.nbytes += sample_tar_size(sample)

    def commit(self) -> int:
        """Finish the tar, fsync, rename into place; returns its size."""
        self._archive.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(_tmp_path(self.path), self.path)
        _fsync_dir(self.path.parent)
        return self.path.stat().st_size

    def discard(self) -> None:
        """Drop the partial shard. Closing flushes buffered bytes, which fails again on a full disk: that is
        expected here and must not mask the error being handled."""
        try:
            self._handle.close()
        except OSError:
            pass
        _tmp_path(self.path).unlink(missing_ok=True)


class ShardWriter:
    """Packs samples into size-capped shards per split, in arrival order; journals every completed shard.

    The journal (`.progress.json`) names each completed shard with its keys, and the slides whose samples are all
    in completed shards (with their manifest records). A rerun skips those slides and those keys and continues with
    the next shard index of each split, so the final shards equal those of an uninterrupted run.
    """

    def __init__(self, out: Path, params: ShardParams, fingerprint: dict[str, Any], journal: dict[str, Any] | None):
        self.out, self.params = out, params
        self.journal = journal or {"params": fingerprint, "shards": {}, "slides": {}}
        self.done_keys = {k for entry in self.journal["shards"].values() for k in entry["keys"]}
        self.open: dict[str, _OpenShard] = {}
        self.pending_records: dict[str, dict[str, Any]] = {}

    def _new_shard(self, split: str) -> _OpenShard:
        index = sum(1 for entry in self.journal["shards"].values() if entry["split"] == split)
        return self.open.setdefault(split, _OpenShard(self.out, split, index))

    def add_slide(self, result: SlideResult, record: dict[str, Any]) -> None:
        todo = [s for s in result.samples if s.key not in self.done_keys]
        if not todo:  # nothing (left) to write: done as soon as seen
            if result.spool:
                Path(result.spool).unlink(missing_ok=True)
            self.journal["slides"][result.slide] = record
            return
        split = result.split
        assert split is not None and result.spool is not None
        shard = self.open.get(split)
        try:
            with open(result.spool, "rb") as spool:
                for sample in todo:
                    size = sample_tar_size(sample)
                    if shard is not None and shard.keys and (
                            _tar_file_size(shard.nbytes + size) > self.params.shard_size
                            or len(shard.keys) >= (self.params.shard_max_samples or math.inf)):
                        self._close(split)
                        shard = None
                    shard = shard or self._new_shard(split)
                    shard.add(sample, spool)
        except OSError as exc:
            raise _disk_error(exc, self.out, shard.name if shard else result.spool) from None
        Path(result.spool).unlink()
        self.pending_records[result.slide] = record
        shard.slides_ending_here.append(result.slide)

    def _close(self, split: str) -> None:
        shard = self.open.pop(split)
        try:
            nbytes = shard.commit()
        except OSError as exc:
            shard.discard()
            raise _disk_error(exc, self.out, shard.name) from None
        self.journal["shards"][shard.name] = {"split": split, "bytes": nbytes, "keys": shard.keys}
        for slide in shard.slides_ending_here:
            self.journal["slides"][slide] = self.pending_records.pop(slide)
        self.done_keys.update(shard.keys)
        self.save_journal()

    def save_journal(self) -> None:
        try:
            atomic_write_bytes(self.out / JOURNAL, json.dumps(self.journal, sort_keys=True).encode("utf-8"))
        except OSError as exc:
            raise _disk_error(exc, self.out, JOURNAL) from None

    def finish(self) -> None:
        for split in sorted(self.open):
            self._close(split)
        self.save_journal()

    def abandon(self) -> None:
        """After an error: drop the partial shards (completed ones and the journal stay)."""
        for shard in self.open.values():
            shard.discard()
        self.open.clear()


def _disk_error(exc: OSError, out: Path, name: str) -> ShardingError:
    if exc.errno == errno.ENOSPC:
        return ShardingError(f"{out}: disk full while writing {name}; completed shards are kept, "
                             "free some space and rerun the same command to resume")
    return ShardingError(f"{out / name}: cannot write ({exc.strerror or exc})")


# ----------------------------------------------------------------------------------------- output folder checks

def params_fingerprint(params: ShardParams, slide_paths: list[Path], labels_csv: str | os.PathLike | None) -> dict:
    """The parameters recorded in the journal and manifest; a rerun into the same folder must match them."""
    fingerprint = json.loads(json.dumps(dataclasses.asdict(params)))
    fingerprint["slides"] = [p.name for p in slide_paths]
    if labels_csv is not None:
        fingerprint["labels_csv"] = Path(labels_csv).name
        fingerprint["labels_sha256"] = hashlib.sha256(Path(labels_csv).read_bytes()).hexdigest()
    else:
        fingerprint["labels_csv"] = None
    return fingerprint


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new))
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")] if old != new else []
    return [prefix.rstrip(".")] if old != new else []


def create_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShardingError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None


def remove_partial_files(out: Path) -> None:
    """Temporaries of an interrupted run (killed, or stopped by a full disk): never complete by construction."""
    for stale in [*out.glob(".*.tmp"), *((out / "qc").glob("*.partial") if (out / "qc").is_dir() else [])]:
        stale.unlink(missing_ok=True)
    shutil.rmtree(out / SPOOL, ignore_errors=True)


def prepare_output(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> tuple[dict | None, dict | None]:
    """Check the folder: returns (journal to resume, finished manifest) -- at most one is not None.

    Folders made with other parameters are refused (one line naming the folder and the differing parameters).
    """
    create_output_folder(out)
    if overwrite:
        for path in [*out.glob("*.tar"), *out.glob(".*.tmp"), out / JOURNAL, out / MANIFEST]:
            path.unlink(missing_ok=True)
        for path in (out / "qc").glob("*.png") if (out / "qc").is_dir() else []:
            path.unlink()
    remove_partial_files(out)
    for name in (JOURNAL, MANIFEST):
        path = out / name
        if not path.exists():
            continue
        try:
            previous = json.loads(path.read_text())
            old_params = previous["params"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ShardingError(f"{path}: unreadable; use a new --out folder or --overwrite") from None
        diff = _differences(old_params, fingerprint)
        if diff:
            raise ShardingError(f"{out}: holds shards made with different parameters ({', '.join(diff)}); "
                                "use a new --out folder or --overwrite")
        if name == JOURNAL:
            for shard, entry in previous["shards"].items():
                if not (out / shard).is_file() or (out / shard).stat().st_size != entry["bytes"]:
                    raise ShardingError(f"{out / shard}: missing or changed since it was journalled; "
                                        "use --overwrite to start again")
            return previous, None
        return None, previous
    if any(out.glob("*.tar")):
        raise ShardingError(f"{out}: holds shards with no {JOURNAL} or {MANIFEST} (unknown parameters); "
                            "use a new --out folder or --overwrite")
    return None, None


# ------------------------------------------------------------------------------------------------------ manifest

def build_manifest(params: ShardParams, fingerprint: dict, classes: list[str], jobs: list[SlideJob],
                   records: dict[str, dict], shards: dict[str, dict]) -> dict[str, Any]:
    mags = [mag_name(m) for m in params.mags]
    splits: dict[str, dict[str, Any]] = {}
    sums = {m: np.zeros(7) for m in mags}
    sizes: dict[str, list[list[int]]] = {m: [] for m in mags}
    for job in jobs:
        rec = records[job.slide]
        if rec["status"] != "ok":
            continue
        entry = splits.setdefault(rec["split"], {"samples": 0, "tissues": 0, "slides": 0, "patients": set(),
                                                 "shards": [], "class_histogram": {c: 0 for c in classes}})
        entry["samples"] += rec["samples"]
        entry["tissues"] += len(rec["sample_tissues"])
        entry["slides"] += 1
        entry["patients"].add(rec["patient"])
        if rec["label"]:
            entry["class_histogram"][rec["label"]] += rec["samples"]
        for m, values in rec["pixel_sums"].items():
            sums[m] += np.asarray(values)
        for sample_sizes in rec["sizes"]:
            for m in mags:
                sizes[m].append(sample_sizes[m])
    for name, shard in sorted(shards.items()):
        splits.setdefault(shard["split"], {"samples": 0, "tissues": 0, "slides": 0, "patients": set(), "shards": [],
                                           "class_histogram": {c: 0 for c in classes}})["shards"].append(name)
    for entry in splits.values():
        entry["patients"] = len(entry["patients"])
    stats = {}
    for m in mags:
        count = sums[m][6]
        if count:
            mean = sums[m][:3] / count
            std = np.sqrt(np.maximum(sums[m][3:6] / count - mean**2, 0.0))
            stats[m] = {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}
    size_stats = {m: {"median": [float(v) for v in np.median(np.asarray(s), axis=0)],
                      "mean": [round(float(v), 3) for v in np.mean(np.asarray(s), axis=0)]}
                  for m, s in sizes.items() if s}
    slide_entries = {job.slide: {k: records[job.slide][k] for k in
                                 ("status", "reason", "split", "patient", "label", "file", "tissues", "samples",
                                  "base_mag", "mag_source")} for job in jobs}
    return {"tool": "hpcdistill", "version": hpcdistill.__version__, "params": fingerprint,
            "mags": [float(m) for m in params.mags], "image_format": params.image_format, "classes": classes,
            "splits": {k: splits[k] for k in sorted(splits)}, "stats": stats, "sizes": size_stats,
            "slides": slide_entries}


# ------------------------------------------------------------------------------------------------------ the run

def _results_in_order(jobs: list[SlideJob], params: ShardParams, out: str, workers: int,
                      ) -> Iterator[tuple[SlideJob, SlideResult]]:
    """Slides run in parallel, results come back in plan order, at most 2*workers in flight (bounded memory)."""
    def wants_stats(job: SlideJob) -> bool:
        return job.split == "train" and job.class_id is not None

    if workers <= 1:
        for job in jobs:
            yield job, shard_slide(job, params, out, wants_stats(job))
        return
    context = multiprocessing.get_context("spawn")  # fork + libvips threads can deadlock
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        queue: collections.deque = collections.deque()
        remaining = iter(jobs)
        for job in remaining:
            queue.append((job, pool.submit(shard_slide, job, params, out, wants_stats(job))))
            if len(queue) >= 2 * workers:
                break
        try:
            while queue:
                job, future = queue.popleft()
                next_job = next(remaining, None)
                if next_job is not None:
                    queue.append((next_job, pool.submit(shard_slide, next_job, params, out, wants_stats(next_job))))
                try:
                    result = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    raise ShardingError(f"{job.path}: a worker process died while sharding it (crash or out of "
                                        "memory); completed shards are kept; check or remove this slide, then rerun") from None
                yield job, result
        finally:  # stopped early (an error, a full disk): queued slides must not start writing spool files
            for _, future in queue:
                future.cancel()


def run_sharding(inputs: Iterable[str | os.PathLike], out: str | os.PathLike, *, labels_csv: str | None = None,
                 params: ShardParams | None = None, workers: int = 1, overwrite: bool = False, strict: bool = False,
                 progress: bool | None = None) -> dict[str, Any]:
    """Shard slides into `out`; returns the manifest. Raises ShardingError when nothing could be sharded or,
    under `strict`, when any slide was skipped (after writing everything that could be written)."""
    from tqdm import tqdm

    params = params or ShardParams()
    out = Path(out)
    slide_paths = collect_slides(inputs)
    jobs, classes = make_plan(slide_paths, labels_csv, params)
    fingerprint = params_fingerprint(params, slide_paths, labels_csv)
    journal, finished = prepare_output(out, fingerprint, overwrite)
    if finished is not None:
        print(f"hpcdistill: {out}: already complete with these parameters; nothing to do", file=sys.stderr)
        manifest = finished
    else:
        writer = ShardWriter(out, params, fingerprint, journal)
        todo = [job for job in jobs if job.slide not in writer.journal["slides"]]
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="slide", desc="shard",
                   disable=None if progress is None else not progress, file=sys.stderr)
        results = _results_in_order(todo, params, str(out), workers)
        try:
            (out / SPOOL).mkdir()
            (out / "qc").mkdir(exist_ok=True)
            with bar:
                for job, result in results:
                    if result.status != "ok":
                        bar.write(f"hpcdistill: skipped {result.reason}", file=sys.stderr)
                    writer.add_slide(result, result.record(job))
                    bar.update(1)
            writer.finish()
        except OSError as exc:  # from a worker (spool, QC image); the writer's own errors are already ShardingErrors
            if exc.errno != errno.ENOSPC:
                raise
            raise _disk_error(exc, out, "a slide's samples") from None
        finally:  # completed shards and the journal stay; partial shards, spool files and QC partials go
            results.close()  # waits for the slides in flight, so none writes after the clean-up
            writer.abandon()
            remove_partial_files(out)
        manifest = build_manifest(params, fingerprint, classes, jobs, writer.journal["slides"],
                                  writer.journal["shards"])
        try:
            atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode())
        except OSError as exc:
            raise _disk_error(exc, out, MANIFEST) from None
        (out / JOURNAL).unlink(missing_ok=True)
    skipped = [(name, s["reason"]) for name, s in manifest["slides"].items() if s["status"] != "ok"]
    if len(skipped) == len(manifest["slides"]):
        raise ShardingError(f"{out}: nothing could be sharded: all {len(skipped)} slide(s) skipped "
                            f"(first: {skipped[0][1]})")
    if strict and skipped:
        raise ShardingError(f"{out}: --strict: {len(skipped)} slide(s) skipped (first: {skipped[0][1]})")
    return manifest
