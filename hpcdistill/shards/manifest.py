"""`manifest.json`, the description of a shard folder: built once by the sharder from the per-slide records, read
by training, evaluation and reports (splits, classes, per-magnification colour statistics, tissue sizes)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

import hpcdistill
from hpcdistill.common.errors import DataError
from hpcdistill.common.files import read_json
from hpcdistill.common.mags import mag_name
from hpcdistill.common.provenance import provenance
from hpcdistill.slides.mag_scale import MagScale
from hpcdistill.slides.stain import StainNorm

MANIFEST = "manifest.json"


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """The folder's manifest, checked against the folder before anything reads it (`check_manifest`)."""
    path = Path(shards_dir) / "manifest.json"
    manifest = read_json(path, DataError, missing="manifest not found (run `hpcdistill shard` first)")
    check_manifest(Path(shards_dir), manifest)
    return manifest


def check_manifest(folder: Path, manifest: Any) -> None:
    """Classes distinct and covering every split's histogram; shard entries plain names of files in the folder, each
    the size the sharder recorded, and as many samples as the split says. An edited or partly replaced folder is one
    line, never a shorter or other dataset read silently."""
    where = folder / MANIFEST
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{where}: not a shard manifest (no splits)")
    classes = manifest.get("classes") or []
    if not isinstance(classes, list) or len(set(map(str, classes))) != len(classes):
        raise DataError(f"{where}: classes must be distinct names, got {str(classes)[:80]}")
    files = manifest.get("files") or {}
    for split, entry in manifest["splits"].items():
        histogram = entry.get("class_histogram") or {}
        unknown = [c for c in histogram if c not in classes]
        if unknown:
            raise DataError(
                f"{where}: split {split} counts class {unknown[0]!r}, not in classes [{', '.join(classes)}]"
            )
        if sum(histogram.values()) not in (0, entry.get("samples")):
            raise DataError(
                f"{where}: split {split} has {entry.get('samples')} samples, its classes count "
                f"{sum(histogram.values())}"
            )
        for name in entry.get("shards", []):
            _check_shard_entry(folder, where, split, name, files.get(name))
        recorded = [files[n]["samples"] for n in entry.get("shards", []) if n in files]
        if files and sum(recorded) != entry.get("samples"):
            raise DataError(
                f"{where}: split {split} says {entry.get('samples')} samples, its shards hold {sum(recorded)}"
            )


def _check_shard_entry(folder: Path, where: Path, split: str, name: Any, recorded: dict | None) -> None:
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise DataError(
            f"{where}: split {split} lists shard {str(name)[:80]!r}: entries are plain file names in {folder}"
        )
    path = folder / name
    if not path.is_file():
        raise DataError(f"{where}: split {split} lists {name}, which is not in {folder}")
    if recorded is not None and path.stat().st_size != recorded["bytes"]:
        raise DataError(
            f"{path}: {path.stat().st_size} bytes, the manifest recorded {recorded['bytes']}: replaced or "
            "cut short since it was written; reshard"
        )


def shard_mag_scale(manifest: dict[str, Any]) -> MagScale:
    """What the shards' magnifications mean (slides.mag_scale); a folder cut before the option: the objective."""
    return MagScale.from_dict((manifest.get("params") or {}).get("mag_scale"), "manifest.json")


def shard_stain(manifest: dict[str, Any]) -> StainNorm:
    """The shards' stain normalisation (slides.stain); a folder cut before the option: none."""
    return StainNorm.from_dict((manifest.get("params") or {}).get("stain"), "manifest.json")


def shard_source(manifest: dict[str, Any]) -> str:
    """Where the shards' crops were cut from: "level0" or "pyramid" (`shard --source`)."""
    return manifest.get("source") or (manifest.get("params") or {}).get("source", "level0")


def default_dataset_name(shards_dir: str | Path) -> str:
    """A shard folder's dataset name when `shard --name` gives none: the folder's name, or its parent's when the
    folder is just called 'shards' (e.g. data/celiac/shards -> celiac)."""
    path = Path(shards_dir).resolve()
    return path.parent.name if path.name == "shards" else path.name


def dataset_name(shards_dir: str | Path, manifest: dict[str, Any]) -> str:
    """The name the manifest records (given at sharding), else the folder's (a manifest older than the record)."""
    return str(manifest.get("name") or default_dataset_name(shards_dir))


def manifest_digest(shards_dir: str | Path) -> str | None:
    """sha256 of manifest.json: the identity of a shard folder wherever it is copied (None: unreadable)."""
    try:
        return hashlib.sha256((Path(shards_dir) / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


def split_summary(manifest: dict[str, Any]) -> str:
    """'train (60), val (30), ...': the manifest's splits and their sample counts, for error messages."""
    return ", ".join(f"{k} ({v.get('samples', 0)})" for k, v in manifest.get("splits", {}).items()) or "none"


def mag_stats(manifest: dict[str, Any], mag: float) -> dict[str, list[float]]:
    name = mag_name(mag)
    cut = [float(m) for m in manifest.get("mags", [])]
    if cut and not any(abs(m - mag) < 1e-9 for m in cut):
        have = ",".join(f"{m:g}" for m in cut)
        raise DataError(
            f"manifest.json: the shards were cut at {', '.join(mag_name(m) for m in cut)}, not at {name}: shard "
            f"again with `hpcdistill shard ... --mags {have},{mag:g}` (or pick a magnification they have)"
        )
    try:
        stats = manifest["stats"][name]
        return {"mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]]}
    except (KeyError, TypeError):
        raise DataError(
            f"manifest.json: no stats for {name} (have {', '.join(manifest.get('stats', {})) or 'none'}): "
            "they come from labeled train slides, and its train split has "
            f"{sum(manifest.get('splits', {}).get('train', {}).get('class_histogram', {}).values())} "
            "labeled samples"
        ) from None


def _empty_split(classes: list[str]) -> dict[str, Any]:
    return {
        "samples": 0,
        "tissues": 0,
        "slides": 0,
        "patients": set(),
        "shards": [],
        "class_histogram": {c: 0 for c in classes},
    }


def _colour_stats(sums: dict[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
    """Per-channel mean and std on [0, 1] from the merged sums (sum, sum of squares, pixel count)."""
    stats = {}
    for m, total in sums.items():
        count = total[6]
        if count:
            mean = total[:3] / count
            std = np.sqrt(np.maximum(total[3:6] / count - mean**2, 0.0))
            stats[m] = {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}
    return stats


SLIDE_FIELDS = (
    "status",
    "reason",
    "split",
    "patient",
    "label",
    "file",
    "tissues",
    "small_tissues",
    "roi",
    "samples",
    "base_mag",
    "mag_source",
    "mpp",
    "stain",
)


def _size_stats(sizes: dict[str, list[list[int]]]) -> dict[str, dict[str, list[float]]]:
    """Median and mean (width, height) of the samples at each magnification, and their smallest side (checked
    against the network's smallest input before training)."""
    return {
        m: {
            "median": [float(v) for v in np.median(np.asarray(s), axis=0)],
            "mean": [round(float(v), 3) for v in np.mean(np.asarray(s), axis=0)],
            "min_side": int(np.asarray(s).min()),
        }
        for m, s in sizes.items()
        if s
    }


def _count_labels(histogram: dict[str, int], rec: dict[str, Any]) -> None:
    """Per sample with region labels (shard --roi-labels); else the slide's label, once per sample."""
    labels = rec.get("sample_labels") or []
    for label in labels if any(labels) else [rec["label"]] * rec["samples"]:
        if label:
            histogram[label] += 1


def build_manifest(
    params: Any,
    fingerprint: dict,
    classes: list[str],
    jobs: list[Any],
    records: dict[str, dict],
    shards: dict[str, dict],
    name: str,
) -> dict[str, Any]:
    """The manifest of a finished sharding run, from each slide's record (in plan order) and the written shards;
    `name`, the dataset's (shard --name, default_dataset_name)."""
    splits, sums, sizes = _tally(params, classes, [records[job.slide] for job in jobs])
    for shard_name, shard in sorted(shards.items()):
        splits.setdefault(shard["split"], _empty_split(classes))["shards"].append(shard_name)
    for entry in splits.values():
        entry["patients"] = len(entry["patients"])
    return {
        "tool": "hpcdistill",
        "version": hpcdistill.__version__,
        "name": name,  # the dataset's name in reports, wherever the folder is copied or whatever it is called
        "provenance": provenance(),
        "params": fingerprint,
        "mags": [float(m) for m in params.mags],
        "image_format": params.image_format,
        "source": params.source,
        "classes": classes,
        "splits": {k: splits[k] for k in sorted(splits)},
        "stats": _colour_stats(sums),
        "sizes": _size_stats(sizes),
        # .get: journals written before a field existed (small_tissues) still finish
        "slides": {job.slide: {k: records[job.slide].get(k) for k in SLIDE_FIELDS} for job in jobs},
        # each shard's size and sample count: a resume and every reader check the folder still holds these files
        "files": {n: {"bytes": s["bytes"], "samples": len(s["keys"])} for n, s in sorted(shards.items())},
    }


def _tally(params: Any, classes: list[str], records: list[dict]) -> tuple[dict, dict, dict]:
    """(per-split counts, per-mag pixel sums, per-mag sample sizes) over the slides sharded whole."""
    mags = [mag_name(m) for m in params.mags]
    splits: dict[str, dict[str, Any]] = {}
    sums = {m: np.zeros(7) for m in mags}
    sizes: dict[str, list[list[int]]] = {m: [] for m in mags}
    for rec in records:
        if rec["status"] != "ok":
            continue
        entry = splits.setdefault(rec["split"], _empty_split(classes))
        entry["samples"] += rec["samples"]
        entry["tissues"] += len(rec["sample_tissues"])
        entry["slides"] += 1
        entry["patients"].add(rec["patient"])
        _count_labels(entry["class_histogram"], rec)
        for m, values in rec["pixel_sums"].items():
            sums[m] += np.asarray(values)
        for sample_sizes in rec["sizes"]:
            for m in mags:
                sizes[m].append(sample_sizes[m])
    return splits, sums, sizes
