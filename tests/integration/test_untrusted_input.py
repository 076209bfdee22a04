"""Untrusted input is bounded before the expensive call, through the real CLI: region files that are devices, FIFOs,
huge, deep, spiky or misplaced; slides whose headers declare what no scanner writes (a decompression bomb, an
objective of 1e308x, a pixel of 1e-9 um); a FIFO or a device where a slide or a checkpoint should be."""

from __future__ import annotations

import csv
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_svs
from slide_fixtures import tissue_image, write_pyramid_tiff
from train_helpers import error_line

from hpcdistill.cli import main
from hpcdistill.synthetic import dataset as synthetic

SHARD = ["--mags", "10,2.5", "--max-size", "96", "--no-progress"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("untrusted") / "a.tiff"
    synthetic.write_slide(path, synthetic.SlideSpec(4096, 3072, fmt="tiff", base_mag=40, class_id=0, seed=3, tissues=3))
    return path


def shard_with_rois(slide: Path, rois: Path, out: Path, capsys) -> tuple[int, str, float]:
    started = time.monotonic()
    code = main.main(["shard", str(slide), "--out", str(out), *SHARD, "--rois", str(rois)])
    return code, capsys.readouterr().err, time.monotonic() - started


def collection(*geometries: dict) -> dict:
    features = [{"type": "Feature", "geometry": g, "properties": {}} for g in geometries]
    return {"type": "FeatureCollection", "features": features}


def star(vertices: int, centre=(2048.0, 1536.0), radii=(1400.0, 1200.0)) -> dict:
    """A valid polygon with `vertices` spikes' worth of vertices: GEOS' validity check is quadratic on it."""
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    r = np.where(np.arange(vertices) % 2 == 0, *radii)
    ring = np.round(np.c_[centre[0] + r * np.cos(t), centre[1] + r * np.sin(t)], 2)
    return {"type": "Polygon", "coordinates": [[*ring.tolist(), ring[0].tolist()]]}


def test_a_fifo_or_a_device_as_a_region_file_is_refused_at_once(slide, tmp_path, capsys):
    fifo = tmp_path / "fifo" / "a.geojson"
    fifo.parent.mkdir()
    os.mkfifo(fifo)  # opened for reading, it would block for ever
    zero = tmp_path / "zero" / "a.geojson"
    zero.parent.mkdir()
    zero.symlink_to("/dev/zero")  # stat says 0 bytes; reading it never ends
    for rois, kind in (
        (fifo.parent, "a FIFO (named pipe)"),
        (zero.parent, "a character device"),
        (zero, "a character device"),
    ):
        code, err, elapsed = shard_with_rois(slide, rois, tmp_path / f"out-{len(kind)}-{rois.name}", capsys)
        assert code == 2 and elapsed < 30, (code, elapsed)
        assert f"is {kind}, not a regular file" in err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (lambda: json.dumps(collection(star(2_000_000))), "vertices, more than a region file may hold"),
        (lambda: "[" * 200_000 + "]" * 200_000, "JSON nested 200000 levels deep"),
        (lambda: "42", "a JSON number: expected a GeoJSON FeatureCollection or Feature"),
        (lambda: json.dumps(collection(star(64, centre=(90_000.0, 90_000.0)))), "wholly outside the slide's 4096x3072"),
        (lambda: json.dumps(collection({"type": "Polygon", "coordinates": [[[0, 0], [1, "x"], [2, 2]]]})), "not a"),
    ],
    ids=["2M-vertices", "deep", "number", "outside", "not-numbers"],
)
def test_a_bad_region_file_is_the_slides_one_line_within_seconds(slide, tmp_path, capsys, content, reason):
    rois = tmp_path / "a.geojson"
    rois.write_text(content())
    code, err, elapsed = shard_with_rois(slide, rois, tmp_path / "out", capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and elapsed < 30, (code, elapsed, line)
    assert line.startswith("hpcdistill: error: ") and str(rois) in line and reason in line, line


def test_a_spiky_region_of_200k_vertices_is_drawn_in_seconds(slide, tmp_path, capsys):
    """GEOS took 6 s to check this polygon's validity and 43 s to make it valid; the scanline fill is linear."""
    rois = tmp_path / "a.geojson"
    rois.write_text(json.dumps(collection(star(200_000))))
    code, err, elapsed = shard_with_rois(slide, rois, tmp_path / "out", capsys)
    assert code == 0 and elapsed < 30, (code, elapsed, err[-300:])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["slides"]["a"]["status"] == "ok" and manifest["slides"]["a"]["tissues"] >= 1


def decompression_bomb(path: Path, side: int = 200_000, tile: int = 256) -> None:
    """A BigTIFF of a few MB declaring a side x side px RGB image in uncompressed tiles, every one of which points at
    the same tile of bytes (written field by field: a TIFF library would write every tile)."""
    count = (side // tile + 1) ** 2
    tile_bytes = tile * tile * 3
    tags = [  # (tag, type, count, value or array); type 3 SHORT, 4 LONG, 5 RATIONAL, 16 LONG8
        (256, 4, 1, side),
        (257, 4, 1, side),
        (258, 3, 3, [8, 8, 8]),
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (277, 3, 1, 3),
        (282, 5, 1, (40_000, 1)),
        (283, 5, 1, (40_000, 1)),
        (284, 3, 1, 1),
        (296, 3, 1, 3),
        (322, 3, 1, tile),
        (323, 3, 1, tile),
        (324, 16, count, None),
        (325, 16, count, None),
    ]
    ifd_at = 16
    data_at = ifd_at + 8 + 20 * len(tags) + 8
    arrays_at, extra = data_at, b""
    entries = b""
    tile_at = arrays_at + 16 * count + 64
    for tag, kind, n, value in tags:
        if tag in (324, 325):
            values = np.full(n, tile_at if tag == 324 else tile_bytes, "<u8").tobytes()
            entries += struct.pack("<HHQQ", tag, kind, n, data_at + len(extra))
            extra += values
        elif kind == 5:
            entries += struct.pack("<HHQ", tag, kind, n) + struct.pack("<II", *value)
        elif n == 1:
            entries += struct.pack("<HHQ", tag, kind, n) + struct.pack("<Q", value)
        else:
            entries += struct.pack("<HHQ", tag, kind, n) + struct.pack("<3H", *value) + b"\0\0"
    header = b"II" + struct.pack("<HHHQ", 43, 8, 0, ifd_at)
    ifd = struct.pack("<Q", len(tags)) + entries + struct.pack("<Q", 0)
    body = header + ifd + extra
    body += b"\0" * (tile_at - len(body))
    path.write_bytes(body + np.full(tile_bytes, 200, np.uint8).tobytes())


def test_implausible_slides_are_skipped_in_seconds_and_the_good_one_is_classified(tiny_teacher, tmp_path, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    decompression_bomb(folder / "bomb.tif")
    image = tissue_image(1024, 768, seed=1)
    write_svs(folder / "huge-mag.svs", image, app_mag=1e308)
    write_pyramid_tiff(folder / "tiny-mpp.tif", image, mpp=0.001, subifds=False)  # 10,000x
    synthetic.write_slide(
        folder / "good.tiff", synthetic.SlideSpec(2048, 1536, fmt="tiff", base_mag=20, class_id=1, seed=5, tissues=2)
    )
    started = time.monotonic()
    assert main.main(["predict", str(tiny_teacher), str(folder), "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    assert time.monotonic() - started < 120
    with open(tmp_path / "p" / "slides.csv", newline="") as fh:
        rows = {row["slide"]: row for row in csv.DictReader(fh)}
    assert rows["good"]["status"] == "ok"
    notes = {name: rows[name]["reason"] for name in ("bomb", "huge-mag", "tiny-mpp")}
    assert all(rows[name]["status"] == "skipped" for name in notes), rows
    assert "implausible slide" in notes["bomb"] and "tiles share data" in notes["bomb"], notes
    assert "implausible metadata: 1e+308x objective power" in notes["huge-mag"] and "--base-mag" in notes["huge-mag"]
    assert "implausible metadata: 0.001 um/px" in notes["tiny-mpp"], notes


def test_a_fifo_slide_and_a_device_checkpoint_are_named_as_what_they_are(tiny_teacher, tmp_path, capsys):
    fifo = tmp_path / "slide.svs"
    os.mkfifo(fifo)
    assert main.main(["predict", str(tiny_teacher), str(fifo), "--out", str(tmp_path / "p")]) == 2
    assert error_line(capsys) == f"hpcdistill: error: {fifo}: is a FIFO (named pipe), not a regular file"
    zero = tmp_path / "best.pt"
    zero.symlink_to("/dev/zero")
    slide = tmp_path / "s.tiff"
    synthetic.write_slide(slide, synthetic.SlideSpec(1024, 768, fmt="tiff", base_mag=20, class_id=0, seed=1, tissues=1))
    assert main.main(["predict", str(zero), str(slide), "--out", str(tmp_path / "q")]) == 2
    assert f"{zero}: is a character device, not a regular file" in error_line(capsys)


def test_predict_skips_a_slide_whose_region_file_is_too_large_and_classifies_the_other(
    slide, tiny_teacher, tmp_path, capsys
):
    """The issue's case: 2 million vertices (35 MB, under the byte limit) held predict for 10 minutes at 1.9 GB."""
    rois = tmp_path / "rois"
    rois.mkdir()
    (rois / "a.geojson").write_text(json.dumps(collection(star(2_000_000))))
    other = tmp_path / "b.tiff"
    synthetic.write_slide(
        other, synthetic.SlideSpec(2048, 1536, fmt="tiff", base_mag=20, class_id=1, seed=5, tissues=2)
    )
    (rois / "b.geojson").write_text(json.dumps(collection(star(2_000, centre=(1024.0, 768.0), radii=(700, 600)))))
    started = time.monotonic()
    argv = ["predict", str(tiny_teacher), str(slide), str(other), "--out", str(tmp_path / "p"), "--rois", str(rois)]
    assert main.main([*argv, "--no-progress"]) == 0
    assert time.monotonic() - started < 60
    with open(tmp_path / "p" / "slides.csv", newline="") as fh:
        rows = {row["slide"]: row for row in csv.DictReader(fh)}
    assert rows["b"]["status"] == "ok" and rows["a"]["status"] == "skipped"
    assert "vertices, more than a region file may hold" in rows["a"]["reason"]
