"""Synthetic slide files and labelled datasets: one scene (scene.py) written as a true Aperio SVS
layout or a generic pyramidal TIFF, and a dataset of such slides with its `labels.csv`.

Writing streams pre-encoded JPEG tiles into tifffile, so memory stays bounded for any slide size; background
tiles reuse one cached encoded tile, and every pyramid level is rendered from the scene at its own resolution
(never from a level-0 image).
"""

from __future__ import annotations

import concurrent.futures
import csv
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import imagecodecs
import numpy as np
import tifffile
from tqdm import tqdm

from hpcdistill.common.errors import SyntheticError
from hpcdistill.common.files import atomic_output
from hpcdistill.common.signals import check_interrupted
from hpcdistill.synthetic.aperio import (
    APERIO_HEADER,
    JPEG_QUALITY,
    aperio_tail,
    fit,
    write_label_and_macro,
    write_stripped,
)
from hpcdistill.synthetic.scanner_pyramid import SCANNER_JPEG_QUALITY, SCANNER_MIN_LEVEL, ScannerPyramid
from hpcdistill.synthetic.scene import CLASS_NAMES, TILE, Scene, make_scene, render_image, render_region
from hpcdistill.synthetic.specs import DatasetSpec, SlideSpec

PYRAMIDS = ("render", "scanner")
MIN_LEVEL_SIZE = 512  # add /4 pyramid levels while their larger side is at least this


# --------------------------------------------------------------------------- slide files


def _encode_jpeg(tile: np.ndarray) -> bytes:
    return imagecodecs.jpeg8_encode(
        tile, level=JPEG_QUALITY, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
    )


def _level_tiles(scene: Scene, downsample: float, width: int, height: int, jpeg: bool) -> Iterator[bytes | np.ndarray]:
    """Yield the tiles of one level in row-major order; background tiles reuse one cached encoding."""
    pixel_um = downsample * scene.mpp
    blank: bytes | np.ndarray | None = None
    for ty in range(0, height, TILE):
        y0, y1 = ty * pixel_um, (ty + TILE) * pixel_um
        row = [p for p in scene.pieces if p.bbox_um[1] < y1 + pixel_um and p.bbox_um[3] > y0 - pixel_um]
        for tx in range(0, width, TILE):
            x0, x1 = tx * pixel_um, (tx + TILE) * pixel_um
            empty = not any(p.bbox_um[0] < x1 + pixel_um and p.bbox_um[2] > x0 - pixel_um for p in row)
            if empty and blank is not None:
                yield blank
                continue
            tile = render_region(scene, tx, ty, TILE, TILE, downsample)
            out = _encode_jpeg(tile) if jpeg else tile
            if empty:
                blank = out
            yield out


def _level_shapes(width: int, height: int, min_size: int = MIN_LEVEL_SIZE) -> list[tuple[int, int, int]]:
    """(downsample, w, h) per pyramid level: level 0 then /4 while the larger side >= min_size."""
    levels = [(1, width, height)]
    f = 4
    while max(width // f, height // f) >= min_size:
        levels.append((f, width // f, height // f))
        f *= 4
    return levels


def _check_request(path: Path, fmt: str, tile: int, base_mag: float, pyramid: str) -> None:
    if fmt not in ("svs", "tiff"):
        raise SyntheticError(f"{path}: fmt {fmt!r} must be 'svs' or 'tiff'")
    if tile != TILE:
        raise SyntheticError(f"{path}: tile {tile} unsupported; only {TILE} is written")
    if not base_mag > 0:
        raise SyntheticError(f"{path}: base_mag {base_mag} must be positive")
    if pyramid not in PYRAMIDS:
        raise SyntheticError(f"{path}: pyramid {pyramid!r} must be one of {', '.join(PYRAMIDS)}")


def write_slide(path: str | os.PathLike, spec: SlideSpec) -> dict:
    """Write one synthetic slide as `spec` says, streaming tile by tile; returns its description (tissue boxes etc.).
    A "scanner" pyramid makes each level from the one above as scanners do (synthetic.scanner_pyramid)."""
    path, s = Path(path), spec
    _check_request(path, s.fmt, s.tile, s.base_mag, s.pyramid)
    mpp = float(s.mpp) if s.mpp is not None else 10.0 / s.base_mag
    scene = make_scene(
        s.width, s.height, mpp=mpp, class_id=s.class_id, seed=s.seed, n_tissues=s.tissues, signal=s.signal, site=s.site
    )
    levels = _level_shapes(s.width, s.height, SCANNER_MIN_LEVEL if s.pyramid == "scanner" else MIN_LEVEL_SIZE)
    tail = aperio_tail(s.base_mag, mpp, s.with_metadata)
    pages = {"fmt": s.fmt, "jpeg": s.jpeg, "aperio_tail": tail, "with_metadata": s.with_metadata}
    _write_file(path, scene, levels, pyramid=s.pyramid, **pages)
    return {
        "path": str(path),
        "format": s.fmt,
        "width": s.width,
        "height": s.height,
        "base_mag": float(s.base_mag),
        "mpp": mpp if s.with_metadata else None,
        "class_id": s.class_id,
        "seed": s.seed,
        "levels": [(lw, lh) for _, lw, lh in levels],
        "tissue_boxes": scene.tissue_boxes(),
        "pyramid": s.pyramid,
    }


def _write_file(path: Path, scene: Scene, levels: list[tuple[int, int, int]], *, pyramid: str, **pages: Any) -> None:
    """The whole file, written atomically: the pyramid (and for SVS its label and macro)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=scene.width * scene.height * 3 > 2**31) as tif:
        with tempfile.TemporaryDirectory(prefix=".scanner-", dir=path.parent) as scratch:
            scanner = ScannerPyramid(Path(scratch), levels, pages["jpeg"]) if pyramid == "scanner" else None
            _write_pyramid(tif, scene, levels, scanner=scanner, **pages)
        if pages["fmt"] == "svs":
            write_label_and_macro(tif, scene)


def _write_pyramid(
    tif: tifffile.TiffWriter,
    scene: Scene,
    levels: list[tuple[int, int, int]],
    *,
    fmt: str,
    jpeg: bool,
    aperio_tail: str,
    with_metadata: bool,
    scanner: ScannerPyramid | None = None,
) -> None:
    """The tiled levels, largest first; SVS: Aperio descriptions, and the stripped thumbnail right after level 0.
    TIFF: resolution tags in px/cm (unless with_metadata is False)."""
    width, height, mpp = scene.width, scene.height, scene.mpp
    compression = ("jpeg", {"level": JPEG_QUALITY}) if jpeg else ("zlib", {"level": 6})
    tiled = dict(
        tile=(TILE, TILE),
        dtype=np.uint8,
        photometric="rgb",
        compression=compression[0],
        compressionargs=compression[1],
        metadata=None,
        software=False,
    )
    q = f"JPEG/RGB Q={JPEG_QUALITY}" if jpeg else "Deflate/RGB"
    head = f"{APERIO_HEADER}\r\n{width}x{height} [0,100 {width}x{height}] ({TILE}x{TILE})"
    for k, (f, lw, lh) in enumerate(levels):
        extra: dict = {}
        if fmt == "svs":
            size = "" if k == 0 else f" -> {lw}x{lh}"
            level_q = q if k == 0 or scanner is None else f"JPEG/RGB Q={SCANNER_JPEG_QUALITY}"
            extra["description"] = f"{head}{size} {level_q}{aperio_tail}"
        elif with_metadata:
            extra.update(resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)), resolutionunit="CENTIMETER")
        if k > 0:
            extra["subfiletype"] = 1
        tiles = _level_tiles(scene, f, lw, lh, jpeg)
        if scanner is not None:
            tiles = scanner.level_tiles(k, lambda f=f, lw=lw, lh=lh: _level_tiles(scene, f, lw, lh, jpeg))
        tif.write(tiles, shape=(lh, lw, 3), **tiled, **extra)
        if fmt == "svs" and k == 0:
            tw, th, d = fit(width, height, 1024)
            thumb_desc = f"{APERIO_HEADER}\r\n{width}x{height} -> {tw}x{th} - {aperio_tail}"
            write_stripped(tif, render_image(scene, tw, th, d), "jpeg", 16, None, thumb_desc)


DATASET_FORMATS = (("svs", 40.0), ("svs", 20.0), ("tiff", 40.0), ("svs", 40.0), ("tiff", 20.0))
LABELS_CSV_COLUMNS = ("slide", "patient", "label", "split")


def write_two_class_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    left_class: int,
    right_class: int,
    *,
    base_mag: float = 40.0,
    seed: int = 0,
) -> dict:
    """A generic pyramidal TIFF whose left half holds one tissue of `left_class` and right half one of
    `right_class` (two scenes side by side): a slide on which a heat map must change class halfway."""
    path, mpp, half = Path(path), 10.0 / base_mag, width // 2
    scenes = [
        make_scene(half, height, mpp=mpp, class_id=left_class, seed=seed, n_tissues=1),
        make_scene(width - half, height, mpp=mpp, class_id=right_class, seed=seed + 1, n_tissues=1),
    ]
    level = np.concatenate([render_image(s, s.width, s.height, 1.0) for s in scenes], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        for k, (f, lw, lh) in enumerate(_level_shapes(width, height)):
            pixels = level if k == 0 else level[: lh * f : f, : lw * f : f][:lh, :lw]
            tif.write(
                np.ascontiguousarray(pixels),
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": JPEG_QUALITY},
                resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
                metadata=None,
                software=False,
            )
    (x, y, w, h), (rx, ry, rw, rh) = scenes[0].tissue_boxes()[0], scenes[1].tissue_boxes()[0]
    return {
        "path": str(path),
        "classes": (left_class, right_class),
        "tissue_boxes": [(x, y, w, h), (rx + half, ry, rw, rh)],
    }


def dataset_classes(classes: Sequence[str] | int) -> list[str]:
    """Class names: an int n picks CLASS_NAMES[:n]; names map in order onto the per-class nuclei table."""
    names = list(CLASS_NAMES[:classes]) if isinstance(classes, int) else [str(c) for c in classes]
    if not 2 <= len(names) <= len(CLASS_NAMES) or len(set(names)) != len(names) or "" in names:
        raise SyntheticError(f"classes {classes!r}: need 2..{len(CLASS_NAMES)} distinct non-empty names")
    return names


def write_dataset(
    out_dir: str | os.PathLike, spec: DatasetSpec = DatasetSpec(), *, workers: int = 1, progress: bool | None = False
) -> tuple[list[Path], Path]:
    """Write labeled slides (splits), unlabeled aux slides and `labels.csv`; returns (slide paths, csv path).

    Labeled slides belong to patients (every third patient has two slides of the same class and split;
    classes cycle over patients). Unlabeled slides have label "" and split 'aux1' (ADv1) or 'aux2' (the
    extra slides of ADv2), so ADv1 = aux1 and ADv2 = aux1 + aux2 (synthetic.specs.DatasetSpec). Deterministic for a
    given seed, whatever `workers` (slides written in parallel processes: every draw is made first, in order).
    `progress`: a bar over the slides (None: on a terminal).
    """
    out = Path(out_dir)
    names = dataset_classes(spec.classes)
    splits = _checked_counts(out, spec)
    rows = _dataset_rows(splits, len(names), spec.aux1, spec.aux2)
    rng = np.random.default_rng([spec.seed, 0xDA7A])
    slides = [_dataset_slide(idx, cls, len(names), rng, spec) for idx, (_, cls, _) in enumerate(rows)]
    out.mkdir(parents=True, exist_ok=True)
    _write_slides(out, slides, workers, progress)
    paths = [out / name for name, _ in slides]
    records = [
        (name, pid, names[cls] if cls is not None else "", split) for (name, _), (pid, cls, split) in zip(slides, rows)
    ]
    csv_path = out / "labels.csv"
    with atomic_output(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABELS_CSV_COLUMNS)
        writer.writerows(records)
    return paths, csv_path


def _checked_counts(out: Path, spec: DatasetSpec) -> dict[str, int]:
    splits = dict(spec.slides_per_split)
    for split, n in splits.items():
        if split.startswith("aux") or not split or n < 0:
            raise SyntheticError(f"slides_per_split[{split!r}]={n}: need a non-aux name and a count >= 0")
    if min(spec.aux1, spec.aux2) < 0 or spec.tissues[0] < 1 or spec.tissues[1] < spec.tissues[0]:
        raise SyntheticError(f"{out}: aux counts must be >= 0 and tissues a range (lo>=1, hi>=lo)")
    return splits


def _dataset_rows(
    splits: dict[str, int], n_classes: int, n_aux1: int, n_aux2: int
) -> list[tuple[str, int | None, str]]:
    """(patient id, class index or None if unlabeled, split) per slide, labeled splits first, then aux1, aux2."""
    rows: list[tuple[str, int | None, str]] = []
    patient = 0
    for split, n in splits.items():
        done, j = 0, 0
        while done < n:
            # Two-slide patients only while every class still gets a patient in this split.
            count = 2 if j % 3 == 1 and n - done - 2 >= n_classes - j - 1 else 1
            rows += [(f"P{patient:03d}", j % n_classes, split)] * count
            done, j, patient = done + count, j + 1, patient + 1
    for split, n in (("aux1", n_aux1), ("aux2", n_aux2)):
        for _ in range(n):
            rows.append((f"A{patient:03d}", None, split))
            patient += 1
    return rows


def _dataset_slide(
    idx: int, cls: int | None, n_classes: int, rng: np.random.Generator, spec: DatasetSpec
) -> tuple[str, SlideSpec]:
    """Slide `idx`'s file name and spec (format and magnification cycling through DATASET_FORMATS), its random draws
    taken from `rng` in slide order."""
    fmt, mag = DATASET_FORMATS[idx % len(DATASET_FORMATS)]
    scale = mag / 40.0 * (0.25 / spec.pixel_um if spec.pixel_um else 1.0)  # the same scene at the true pixel size
    n_t = int(rng.integers(spec.tissues[0], spec.tissues[1] + 1))
    # Unlabeled slides still draw from the same class mixture (their label is just not given).
    cls_id = cls if cls is not None else int(rng.integers(0, n_classes))
    slide_seed = int(rng.integers(0, 2**31 - 1))
    return f"slide_{idx:03d}.{fmt}", SlideSpec(
        width=max(64, round(spec.size[0] * scale)),
        height=max(64, round(spec.size[1] * scale)),
        fmt=fmt,
        base_mag=mag,
        class_id=cls_id,
        seed=slide_seed,
        tissues=n_t,
        jpeg=spec.jpeg,
        signal=spec.signal,
        pyramid=spec.pyramid,
        site=spec.site,
        mpp=spec.pixel_um * 40.0 / mag if spec.pixel_um else None,
    )


def _write_one(path: Path, spec: SlideSpec) -> None:
    write_slide(path, spec)


def _write_slides(out: Path, slides: list[tuple[str, SlideSpec]], workers: int, progress: bool | None) -> None:
    bar = tqdm(total=len(slides), desc="synth", unit="slide", disable=None if progress is None else not progress)
    with bar:
        if workers <= 1:
            for name, spec in slides:
                _write_one(out / name, spec)
                bar.update(1)
                check_interrupted()
            return
        context = multiprocessing.get_context("spawn")  # no fork of a process holding libvips threads
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            for _ in pool.map(_write_one, [out / name for name, _ in slides], [spec for _, spec in slides]):
                bar.update(1)
