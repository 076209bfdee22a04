"""Synthetic slides: real SVS/TIFF files read back with OpenSlide, pyvips and tifffile."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import openslide
import pytest
import pyvips
import tifffile
from scipy import ndimage

from hpcdistill.common.errors import SyntheticError
from hpcdistill.synthetic import dataset as S
from hpcdistill.synthetic.scene import make_scene, render_region


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tissue_centre(info: dict) -> tuple[int, int]:
    x, y, w, h = info["tissue_boxes"][0]
    return x + w // 2, y + h // 2


@pytest.mark.parametrize("base_mag,mpp", [(40, 0.25), (20, 0.5)])
def test_svs_is_a_true_aperio_file(tmp_path, base_mag, mpp):
    path = tmp_path / "a.svs"
    info = S.write_slide(path, S.SlideSpec(2600, 2100, fmt="svs", base_mag=base_mag, class_id=1, seed=3, tissues=2))
    assert info["levels"] == [(2600, 2100), (650, 525)]
    with tifffile.TiffFile(path) as tif:
        pages = tif.pages
        assert pages[0].is_tiled and pages[0].compression == 7 and pages[0].tilewidth == 256
        assert pages[0].description.startswith(
            f"Aperio Image Library v12.0.0\r\n2600x2100 [0,100 2600x2100] (256x256) JPEG/RGB Q=90"
            f"|AppMag = {base_mag}|MPP = {mpp:.4f}"
        )
        assert not pages[1].is_tiled  # stripped thumbnail
        assert pages[2].is_tiled and pages[2].shape[:2] == (525, 650)
        assert "-> 650x525" in pages[2].description
        assert "label" in pages[3].description and not pages[3].is_tiled
        assert "macro" in pages[4].description and not pages[4].is_tiled
    with openslide.OpenSlide(str(path)) as slide:
        props = slide.properties
        assert props["openslide.vendor"] == "aperio"
        assert float(props["openslide.objective-power"]) == base_mag
        assert float(props["openslide.mpp-x"]) == pytest.approx(mpp)
        assert slide.level_count == 2
        assert slide.level_dimensions == ((2600, 2100), (650, 525))
        assert set(slide.associated_images) == {"thumbnail", "label", "macro"}
        cx, cy = _tissue_centre(info)
        got = np.asarray(slide.read_region((cx - 128, cy - 128), 0, (256, 256)).convert("RGB"), np.float32)
        # Level 1 is rendered separately from level 0; its colours must agree with level 0 downsampled.
        low = np.asarray(slide.read_region((cx - 256, cy - 256), 1, (128, 128)).convert("RGB"), np.float32)
        high = np.asarray(slide.read_region((cx - 256, cy - 256), 0, (512, 512)).convert("RGB"), np.float32)
    scene = make_scene(2600, 2100, mpp=mpp, class_id=1, seed=3, n_tissues=2)
    want = render_region(scene, cx - 128, cy - 128, 256, 256).astype(np.float32)
    assert np.abs(got - want).mean() < 4  # only JPEG loss
    assert np.abs(low.mean((0, 1)) - high.mean((0, 1))).max() < 4
    image = pyvips.Image.new_from_file(str(path))
    assert (image.width, image.height, image.bands) == (2600, 2100, 3)


def test_generic_tiff_reports_mpp_but_no_objective(tmp_path):
    path = tmp_path / "g.tiff"
    info = S.write_slide(path, S.SlideSpec(2200, 1800, fmt="tiff", base_mag=20, class_id=0, seed=5, tissues=2))
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert "openslide.objective-power" not in slide.properties
        assert slide.level_dimensions == ((2200, 1800), (550, 450))
    image = pyvips.Image.new_from_file(str(path))
    assert (image.width, image.height) == (2200, 1800)
    assert 1000.0 / image.get("xres") == pytest.approx(0.5)  # libvips reports pixels per mm
    assert info["mpp"] == 0.5


@pytest.mark.parametrize("fmt", ["svs", "tiff"])
def test_without_metadata_has_no_magnification_or_mpp(tmp_path, fmt):
    path = tmp_path / f"bare.{fmt}"
    S.write_slide(path, S.SlideSpec(1200, 1000, fmt=fmt, seed=1, tissues=1, with_metadata=False))
    with openslide.OpenSlide(str(path)) as slide:
        assert "openslide.objective-power" not in slide.properties
        assert "openslide.mpp-x" not in slide.properties
    with tifffile.TiffFile(path) as tif:
        assert "AppMag" not in (tif.pages[0].description or "")
        assert tif.pages[0].tags["ResolutionUnit"].value == 1  # NONE: resolution unknown


def test_same_seed_same_bytes_other_seed_other_pixels(tmp_path):
    a, b, c = tmp_path / "a.svs", tmp_path / "b.svs", tmp_path / "c.svs"
    for path, seed in ((a, 11), (b, 11), (c, 12)):
        S.write_slide(path, S.SlideSpec(1500, 1100, fmt="svs", class_id=2, seed=seed, tissues=2))
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)


@pytest.mark.parametrize("downsample", [1.0, 4.0])
def test_regions_are_seamless_across_tile_boundaries(downsample):
    scene = make_scene(3000, 3000, mpp=0.25, class_id=2, seed=4, n_tissues=1)
    x0, y0 = (v // int(downsample) // 256 * 256 for v in _tissue_centre({"tissue_boxes": scene.tissue_boxes()}))
    whole = render_region(scene, x0, y0, 512, 512, downsample)

    def tile(i: int, j: int) -> np.ndarray:
        return render_region(scene, x0 + 256 * i, y0 + 256 * j, 256, 256, downsample)

    tiles = np.concatenate([np.concatenate([tile(i, j) for i in range(2)], axis=1) for j in range(2)], axis=0)
    assert np.array_equal(whole, tiles)
    crossing = render_region(scene, x0 + 200, y0 + 150, 120, 130, downsample)
    assert np.array_equal(crossing, whole[150:280, 200:320])
    assert (whole.mean(2) < 150).mean() > 0.005  # really crosses tissue with nuclei


def _nuclear_stats(class_id: int, seed: int) -> tuple[float, float, np.ndarray]:
    """(mean dark connected-component area px, mean elongation, mean RGB after a 16x box downsample)."""
    scene = make_scene(3000, 3000, mpp=0.25, class_id=class_id, seed=seed, n_tissues=1)
    cx, cy = _tissue_centre({"tissue_boxes": scene.tissue_boxes()})
    image = render_region(scene, cx - 384, cy - 384, 768, 768).astype(np.float32)
    labels, n = ndimage.label(image.mean(2) < 140)
    areas = np.bincount(labels.ravel())[1:]
    elongations = []
    for sl in ndimage.find_objects(labels):
        ys, xs = np.nonzero(labels[sl] > 0)
        if ys.size > 20:
            ev = np.linalg.eigvalsh(np.cov(np.stack([xs, ys])))
            elongations.append(np.sqrt(ev[1] / max(ev[0], 1e-6)))
    low = image.reshape(48, 16, 48, 16, 3).mean((1, 3))
    return float(areas.mean()), float(np.mean(elongations)), low.mean((0, 1))


def test_class_signal_is_in_fine_detail_not_in_low_resolution_colour():
    stats = {c: _nuclear_stats(c, seed=0) for c in range(3)}
    normal, duodenitis, celiac = stats[0], stats[1], stats[2]
    assert duodenitis[0] < 0.7 * normal[0]  # many small nuclei vs medium ones
    assert celiac[1] > 1.6 * normal[1]  # elongated vs round at similar area
    colour_gap = max(np.abs(stats[a][2] - stats[b][2]).max() for a in range(3) for b in range(3))
    other_slide = _nuclear_stats(0, seed=7)[2]
    assert colour_gap < 2.5  # grey levels: equal hematoxylin area fraction across classes
    assert np.abs(other_slide - normal[2]).max() > 2 * colour_gap  # stain variation between slides dominates
    # signal=0 makes classes indistinguishable even at full resolution.
    a = render_region(make_scene(800, 800, mpp=0.25, class_id=0, seed=2, n_tissues=1, signal=0.0), 0, 0, 800, 800)
    b = render_region(make_scene(800, 800, mpp=0.25, class_id=1, seed=2, n_tissues=1, signal=0.0), 0, 0, 800, 800)
    assert np.array_equal(a, b)


def test_dataset_labels_patients_and_aux_splits(tmp_path):
    paths, csv_path = S.write_dataset(
        tmp_path / "ds",
        S.DatasetSpec(
            slides_per_split={"train": 5, "val": 3, "test": 3}, aux1=2, aux2=2, size=(1000, 800), tissues=(1, 2), seed=9
        ),
    )
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == ["slide", "patient", "label", "split"]
    assert len(rows) == len(paths) == 15
    assert all((csv_path.parent / r["slide"]).is_file() for r in rows)
    assert {p.suffix for p in paths} == {".svs", ".tiff"}
    by_patient: dict[str, list[dict]] = {}
    for r in rows:
        by_patient.setdefault(r["patient"], []).append(r)
    twins = [v for v in by_patient.values() if len(v) == 2]
    assert twins and all(len({(r["label"], r["split"]) for r in v}) == 1 for v in twins)
    for split in ("train", "val", "test"):
        assert {r["label"] for r in rows if r["split"] == split} == {"normal", "duodenitis", "celiac"}
    aux1 = {r["slide"] for r in rows if r["split"] == "aux1"}
    aux2 = {r["slide"] for r in rows if r["split"] == "aux2"}
    assert len(aux1) == len(aux2) == 2 and not aux1 & aux2  # ADv1 = aux1 is a strict subset of ADv2
    assert all(r["label"] == "" for r in rows if r["split"].startswith("aux"))
    mags = set()
    for path in paths:
        with openslide.OpenSlide(str(path)) as slide:
            mags.add(slide.properties.get("openslide.objective-power"))
            assert float(slide.properties["openslide.mpp-x"]) in (0.25, 0.5)
    assert {"40", "20", None} <= mags
    again, _ = S.write_dataset(
        tmp_path / "ds2",
        S.DatasetSpec(
            slides_per_split={"train": 5, "val": 3, "test": 3}, aux1=2, aux2=2, size=(1000, 800), tissues=(1, 2), seed=9
        ),
    )
    assert [_sha(p) for p in paths] == [_sha(p) for p in again]


def test_bad_arguments_give_one_line_errors(tmp_path):
    with pytest.raises(SyntheticError, match=r"x\.png: fmt 'png'"):
        S.write_slide(tmp_path / "x.png", S.SlideSpec(500, 500, fmt="png"))
    with pytest.raises(SyntheticError, match="class_id 9"):
        S.write_slide(tmp_path / "x.svs", S.SlideSpec(500, 500, class_id=9))
    with pytest.raises(SyntheticError, match="classes"):
        S.write_dataset(tmp_path, S.DatasetSpec(classes=["a"]))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_large_slide_streams_with_bounded_memory(tmp_path):
    """Writing 16000x16000 (768 MB raw RGB) must not grow peak RSS by more than a small fraction of that."""
    script = textwrap.dedent(f"""
        from hpcdistill.synthetic.dataset import write_slide
        from hpcdistill.synthetic.specs import SlideSpec
        def hwm():
            for line in open('/proc/self/status'):
                if line.startswith('VmHWM'):
                    return int(line.split()[1]) * 1024
        before = hwm()
        info = write_slide({str(tmp_path / "big.svs")!r}, SlideSpec(16000, 16000, fmt='svs', seed=1, tissues=2))
        print(before, hwm(), len(info['levels']))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after, levels = map(int, out.stdout.split())
    assert levels == 3
    assert after - before < 120 * 2**20, f"peak RSS grew by {(after - before) / 2**20:.0f} MiB"
    with openslide.OpenSlide(str(tmp_path / "big.svs")) as slide:
        assert slide.dimensions == (16000, 16000)


def test_lossless_svs_reads_back_exactly_the_rendered_pixels(tmp_path):
    path = tmp_path / "lossless.svs"
    info = S.write_slide(path, S.SlideSpec(1300, 900, fmt="svs", class_id=3, seed=8, tissues=1, jpeg=False))
    cx, cy = _tissue_centre(info)
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        got = np.asarray(slide.read_region((cx - 150, cy - 100), 0, (300, 200)).convert("RGB"))
    scene = make_scene(1300, 900, mpp=0.25, class_id=3, seed=8, n_tissues=1)
    assert np.array_equal(got, render_region(scene, cx - 150, cy - 100, 300, 200))
