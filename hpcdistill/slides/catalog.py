"""The slides a sharding run starts from: slide files found on disk, the labels CSV matched to them, and the
patient-level split assignment (explicit splits win; the rest stratified by class, seeded)."""

from __future__ import annotations

import csv
import glob
import io
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from hpcdistill.common.console import say
from hpcdistill.common.errors import SlideError
from hpcdistill.common.limits import read_bounded, regular_file

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu")
DICOM_SUFFIX = ".dcm"  # a folder of DICOM WSI instances (one per level) is one slide, named by the folder


def dicom_instance(folder: str | os.PathLike) -> Path:
    """The instance OpenSlide opens for a DICOM WSI folder (it finds the series' other levels beside it)."""
    instances = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == DICOM_SUFFIX and p.is_file())
    if not instances:
        raise SlideError(f"{folder}: a folder is read as a slide only when it holds DICOM WSI instances (.dcm)")
    return instances[0]


def _slides_under(folder: Path) -> set[Path]:
    """The slide files under `folder`, and the folders holding DICOM instances (each one slide)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    found = {p for p in files if p.suffix.lower() in SLIDE_EXTENSIONS}
    return found | {p.parent for p in files if p.suffix.lower() == DICOM_SUFFIX}


def key_safe(slide: str) -> str:
    """A slide's name as WebDataset sample keys carry it: only [A-Za-z0-9_-] (a key is split at its first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", slide)


SPLIT_NAME = re.compile(r"^(train|val|test|dev|aux|aux[A-Za-z0-9_]+)$")


def collect_slides(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, directories scanned recursively for known slide extensions (a folder of DICOM instances is one
    slide), globs expanded; sorted, unique."""
    found: set[Path] = set()
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found.update(_slides_under(path))
        elif path.is_file():
            found.add(path)
        elif path.exists() and not glob.has_magic(text):
            regular_file(path, SlideError)  # a device, FIFO or socket: said as what it is
        elif glob.has_magic(text):
            matches = [Path(p) for p in glob.glob(text, recursive=True)]
            files = [p for p in matches if p.is_file()]
            for p in matches:
                if p.is_dir():
                    files.extend(_slides_under(p))
            if not files:
                raise SlideError(f"{text}: the pattern matches no files")
            found.update(files)
        else:
            raise SlideError(f"{text}: no such file or directory")
    paths = sorted({p.resolve() for p in found})
    if not paths:
        raise SlideError(f"{', '.join(map(str, inputs)) or '(no inputs)'}: no slide files found")
    check_slide_ids(paths)
    return paths


def check_slide_ids(paths: Iterable[str | os.PathLike]) -> None:
    """A slide is named by its id (file name without extension) in keys, labels, the manifest and every output:
    two files with one id would be one slide."""
    names: dict[str, Path] = {}
    keys: dict[str, Path] = {}
    for p in map(Path, paths):
        if names.setdefault(slide_name(p), p) != p:
            raise SlideError(f"{p}: same slide name {slide_name(p)!r} as {names[slide_name(p)]}; rename one")
        key = key_safe(slide_name(p))  # sample keys keep [A-Za-z0-9_-]: `x y`, `x,y` and `x-y` would meet
        if keys.setdefault(key, p) != p:
            raise SlideError(
                f"{p}: its samples would share their keys ({key}_t...) with {keys[key]}'s; "
                "rename one (keys keep letters, digits, '_' and '-')"
            )


def slide_name(path: Path) -> str:
    """The slide's id in keys, labels and the manifest: its file name without the extension (a DICOM folder's
    name)."""
    return path.name[: -len(path.suffix)] if path.suffix else path.name


@dataclass(frozen=True)
class LabelRow:
    slide: str
    patient: str
    label: str  # "" = unlabeled
    split: str  # "" = to be assigned
    line: int
    path: Path  # the slide file it matched


def read_labels_csv(
    csv_path: str | os.PathLike, slide_paths: list[Path], *, other_slides: bool = False
) -> dict[Path, LabelRow]:
    """Parse `slide,patient,label,split` (patient, label, split optional) and match rows to the slide files. A row
    naming no input slide is refused, or with `other_slides` (a cohort's CSV, of which some slides are scored)
    passed over."""
    csv_path = Path(csv_path)
    reader = _labels_reader(csv_path)
    lookup = _slide_lookup(slide_paths)
    rows: dict[Path, LabelRow] = {}
    first_line: dict[Path, int] = {}
    for record in reader:
        line = reader.line_num
        values = {k: (v or "").strip() for k, v in record.items() if k is not None}
        if not any(values.values()):
            continue
        slide = values.get("slide", "")
        if not slide:
            raise SlideError(f"{csv_path}:{line}: empty slide name")
        path = lookup.get(slide) or lookup.get(str((csv_path.parent / slide).resolve()))
        if path is None and other_slides:
            continue
        if path is None:
            raise SlideError(f"{csv_path}:{line}: unknown slide {slide!r} (not among the input slide files)")
        if path in rows:
            raise SlideError(f"{csv_path}:{line}: duplicate row for slide {slide!r} (first at line {first_line[path]})")
        split = values.get("split", "")
        if split and not SPLIT_NAME.match(split):
            raise SlideError(
                f"{csv_path}:{line}: unknown split {split!r} (allowed: train, val, test, dev, aux, aux<name>)"
            )
        rows[path] = LabelRow(
            slide_name(path), values.get("patient", "") or slide_name(path), values.get("label", ""), split, line, path
        )
        first_line[path] = line
    _check_patient_splits(csv_path, rows)
    return rows


def _labels_reader(csv_path: Path) -> csv.DictReader:
    """The CSV's rows with stripped column names; one line for an unreadable file or a missing column."""
    data = read_bounded(csv_path, "csv_bytes", SlideError)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SlideError(f"{csv_path}: cannot read labels CSV (not UTF-8 text: {exc.reason})") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "slide" not in columns:
        raise SlideError(f"{csv_path}:1: header must have a 'slide' column (slide,patient,label,split)")
    if "label" not in columns:  # else every slide would silently become unlabeled
        raise SlideError(
            f"{csv_path}:1: no 'label' column (columns: {', '.join(columns)}); add one (an empty "
            "label marks an unlabeled slide), or shard without --labels to treat every slide as "
            "unlabeled (split aux)"
        )
    if "patient" not in columns:  # patient-level splits and scores then hold one slide per patient
        say(
            f"{csv_path}: no 'patient' column: each slide is its own patient (a patient's slides may land in "
            "different splits, and patient-level scores count slides); add the column if patients have several"
        )
    reader.fieldnames = columns
    return reader


def _slide_lookup(slide_paths: list[Path]) -> dict[str, Path]:
    """What a CSV row may call a slide: its file name, its name without extension, or its path."""
    lookup: dict[str, Path] = {}
    for p in slide_paths:
        for name in (p.name, slide_name(p), str(p)):
            lookup.setdefault(name, p)
    return lookup


def _check_patient_splits(csv_path: Path, rows: dict[Path, LabelRow]) -> None:
    """A patient's slides share one of train/val/test/dev (else leakage); aux may share patients."""
    explicit: dict[str, LabelRow] = {}
    for row in sorted(rows.values(), key=lambda r: r.line):
        if row.split and not row.split.startswith("aux"):
            other = explicit.setdefault(row.patient, row)
            if other.split != row.split:
                raise SlideError(
                    f"{csv_path}:{row.line}: patient {row.patient!r} in split {row.split!r} "
                    f"but in {other.split!r} at line {other.line}"
                )


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
