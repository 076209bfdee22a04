"""slides.py on real slide files written here with tifffile: a true Aperio SVS layout, pyramidal TIFFs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import openslide
import pytest
import pyvips
import tifffile
from conftest import TILE, write_svs
from PIL import Image

from hpcdistill.common.errors import HpcdistillError, SlideError
from hpcdistill.slides import resample
from hpcdistill.slides.factory import open_slide
from hpcdistill.slides.metadata import mag_from_mpp
from hpcdistill.slides.resample import lanczos_to_size
from hpcdistill.slides.slide import target_size

BACKGROUND = 240


def write_pyramid_tiff(path: Path, image: np.ndarray, *, mpp: float | None, subifds: bool) -> None:
    """Generic tiled pyramidal TIFF (lossless), levels as SubIFDs or pages; mpp only in resolution tags."""
    res = dict(resolution=(10000 / mpp, 10000 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    common = dict(photometric="rgb", compression="zlib", tile=(TILE, TILE), metadata=None, **res)
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, subifds=1 if subifds else 0, **common)
        tw.write(np.ascontiguousarray(image[::4, ::4]), subfiletype=1, **common)


def tissue_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), BACKGROUND, np.uint8)
    image[height // 4 : height // 2, width // 5 : width // 2] = (200, 110, 170)
    image += rng.integers(0, 6, image.shape, dtype=np.uint8)
    return image


@pytest.fixture(scope="module")
def svs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("svs") / "slide.svs"
    image = tissue_image(2100, 1500)
    level1 = np.ascontiguousarray(image[::4, ::4])
    level1[:8, :8] = (0, 255, 0)  # only in the reduced level: proves where the thumbnail came from
    write_svs(path, image, level1=level1)
    return path


def test_svs_is_a_true_aperio_layout_and_metadata_is_read(svs):
    with openslide.OpenSlide(svs) as osr:  # the file is what OpenSlide calls Aperio, with its associated images
        assert osr.properties["openslide.vendor"] == "aperio"
        assert set(osr.associated_images) == {"thumbnail", "label", "macro"}
    with open_slide(svs) as slide:
        info = slide.info
        assert (info.width, info.height) == (2100, 1500)
        assert info.base_mag == 20.0 and info.mag_source == "objective-power"
        assert info.mpp == pytest.approx(0.499)
        assert info.level_count == 2 and info.vendor == "aperio"
        assert slide.backend == "vips"


def test_base_mag_override(svs):
    with open_slide(svs, base_mag=40) as slide:
        assert slide.info.base_mag == 40.0 and slide.info.mag_source == "override"
        assert slide.info.mpp == pytest.approx(0.499)


@pytest.mark.parametrize("subifds", [False, True])
def test_pyramidal_tiff_magnification_from_resolution_tags(tmp_path, subifds):
    path = tmp_path / "pyramid.tif"
    write_pyramid_tiff(path, tissue_image(1024, 768), mpp=0.25, subifds=subifds)
    with open_slide(path) as slide:
        assert slide.info.base_mag == 40.0 and slide.info.mag_source == "mpp"
        assert slide.info.mpp == pytest.approx(0.25)
        assert slide.info.level_count == 2
        assert (slide.info.width, slide.info.height) == (1024, 768)


@pytest.mark.parametrize(
    "mpp, mag", [(0.25, 40.0), (0.2525, 40.0), (0.499, 20.0), (0.5, 20.0), (1.0, 10.0), (0.3, 33.3), (0.126, 80.0)]
)
def test_mag_from_mpp(mpp, mag):
    assert mag_from_mpp(mpp) == mag


def assert_one_line_error(err: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    text = str(err.value)
    assert isinstance(err.value, HpcdistillError)
    assert "\n" not in text and text.startswith(f"{path}: ")
    for word in words:
        assert word in text


def test_tiff_without_metadata_is_a_clear_error(tmp_path):
    path = tmp_path / "bare.tif"
    write_pyramid_tiff(path, tissue_image(512, 512), mpp=None, subifds=False)
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert_one_line_error(err, path, "no magnification metadata", "--base-mag")
    with open_slide(path, base_mag=20) as slide:  # the remedy the message names works
        assert slide.info.base_mag == 20.0 and slide.info.mpp is None


def test_truncated_svs_is_a_clear_error(tmp_path, svs, caplog, capfd):
    path = tmp_path / "truncated.svs"
    data = svs.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert_one_line_error(err, path)
    # our one line only: tifffile's own "invalid page offset" log line is muted while probing, and only then
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]
    assert "invalid page offset" not in capfd.readouterr().err
    assert not logging.getLogger("tifffile").filters


def test_corrupt_tile_data_is_a_clear_error_on_read(tmp_path, svs):
    path = tmp_path / "garbled.svs"
    data = bytearray(svs.read_bytes())
    with tifffile.TiffFile(svs) as tif:
        page = tif.pages[0]
        first, count = page.dataoffsets[0], page.databytecounts[0]
    data[first : first + count] = b"\x00" * count  # header intact, first tile's JPEG stream destroyed
    path.write_bytes(bytes(data))
    with pytest.raises(SlideError) as err, open_slide(path) as slide:
        slide.read_at_mag((0, 0, 512, 512), 10, (256, 256))
    assert_one_line_error(err, path, "cannot read box")


def test_text_file_and_missing_file_are_clear_errors(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("not a slide\n")
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert_one_line_error(err, path, "unsupported or corrupt")
    with pytest.raises(SlideError) as err:
        open_slide(tmp_path / "absent.svs")
    assert_one_line_error(err, tmp_path / "absent.svs", "no such file")


def test_thumbnail_comes_from_the_reduced_level(svs):
    with open_slide(svs) as slide:
        thumb, scale = slide.thumbnail(max_size=400)
    assert thumb.dtype == np.uint8 and thumb.shape[2] == 3
    assert max(thumb.shape[:2]) == 400
    assert scale == pytest.approx(2100 / thumb.shape[1])
    corner = thumb[:2, :2].astype(int)
    assert (corner[..., 1] > 150).all() and (corner[..., 0] < 100).all()  # the level-1-only green marker


def test_svs_levels_flagged_reduced_are_still_pyramid_levels(tmp_path):
    """tifffile's SVS series stops at a level page with subfiletype 'reduced' (as our synthetic writer sets);
    the level scan must not, or the thumbnail would decode the whole level 0."""
    image = tissue_image(2100, 1500)
    level1 = np.ascontiguousarray(image[::4, ::4])
    level1[:8, :8] = (0, 255, 0)
    path = tmp_path / "reduced.svs"
    write_svs(path, image, level1=level1, level_subfiletype=1)
    with open_slide(path) as slide:
        assert slide.info.level_count == 2  # the stripped thumbnail, label and macro are not levels
        thumb, scale = slide.thumbnail(max_size=400)
    assert max(thumb.shape[:2]) == 400 and scale == pytest.approx(2100 / thumb.shape[1])
    assert thumb[0, 0, 1] > 150 and thumb[0, 0, 0] < 100  # the level-1-only marker


@pytest.fixture(scope="module")
def marker_slide(tmp_path_factory):
    """40x lossless slide, a 16x16 black marker whose level-0 centre is (1207.5, 807.5)."""
    image = np.full((1536, 2048, 3), 255, np.uint8)
    image[800:816, 1200:1216] = 0
    path = tmp_path_factory.mktemp("marker") / "marker.tif"
    write_pyramid_tiff(path, image, mpp=0.25, subifds=False)
    return path, (1207.5, 807.5)


def centroid_of_dark(image: np.ndarray) -> tuple[float, float]:
    weight = 255.0 - image.astype(np.float64).mean(axis=2)
    weight[weight < 8] = 0  # ignore Lanczos ringing
    yy, xx = np.mgrid[: weight.shape[0], : weight.shape[1]]
    return float((xx * weight).sum() / weight.sum()), float((yy * weight).sum() / weight.sum())


@pytest.mark.parametrize("backend", ["vips", "openslide"])
@pytest.mark.parametrize("mag", [10.0, 2.5])
def test_read_at_mag_puts_a_marker_at_the_scaled_position(marker_slide, mag, backend):
    path, (cx, cy) = marker_slide
    box = (100, 200, 1800, 1200)
    with open_slide(path, backend=backend) as slide:
        assert slide.backend == backend
        size = target_size(box[2:], slide.info.base_mag, mag)
        crop = slide.read_at_mag(box, mag, size)
    assert crop.shape == (size[1], size[0], 3)
    shrink_x, shrink_y = box[2] / size[0], box[3] / size[1]
    want_x = (cx - box[0] + 0.5) / shrink_x - 0.5  # pixel-centre convention
    want_y = (cy - box[1] + 0.5) / shrink_y - 0.5
    got_x, got_y = centroid_of_dark(crop)
    assert abs(got_x - want_x) <= 1.0 and abs(got_y - want_y) <= 1.0


def test_vips_and_openslide_backends_agree(svs):
    box, size = (150, 250, 1500, 1000), (375, 250)
    with open_slide(svs) as fast, open_slide(svs, backend="openslide") as fallback:
        a = fast.read_at_mag(box, 5.0, size).astype(int)
        b = fallback.read_at_mag(box, 5.0, size).astype(int)
    assert np.abs(a - b).max() <= 1


def test_read_at_mag_edges_and_limits(svs):
    with open_slide(svs) as slide:
        out = slide.read_at_mag((-400, -400, 800, 800), 10, (400, 400))  # half outside: white there
        assert out.shape == (400, 400, 3)
        assert (out[:150, :150] == 255).all() and (out[250:, 250:] < 255).any()
        with pytest.raises(SlideError, match="exceeds the base magnification"):
            slide.read_at_mag((0, 0, 100, 100), 40, (200, 200))
        with pytest.raises(SlideError, match="outside"):
            slide.read_at_mag((5000, 0, 100, 100), 10, (50, 50))
        size = target_size((103, 99), 20, 20)  # mag == base: rounding via 10x makes it 1 px larger
        assert size == (104, 100)
        assert slide.read_at_mag((300, 400, 103, 99), 20, size).shape == (100, 104, 3)


@pytest.mark.parametrize("base_mag", [20.0, 40.0])
def test_target_size_low_mags_are_the_10x_size_divided(base_mag):
    rng = np.random.default_rng(1)
    for w, h in rng.integers(1, 20000, size=(500, 2)):
        at10 = target_size((int(w), int(h)), base_mag, 10.0)
        assert at10 == (max(1, round(w * 10 / base_mag)), max(1, round(h * 10 / base_mag)))
        for n, mag in ((2, 5.0), (4, 2.5), (8, 1.25), (16, 0.625)):
            low = target_size((int(w), int(h)), base_mag, mag)
            assert min(low) >= 1
            assert abs(low[0] - at10[0] / n) <= 1 and abs(low[1] - at10[1] / n) <= 1


def test_lanczos_to_size_hits_exact_sizes_and_matches_pil():
    rng = np.random.default_rng(2)
    noise = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(noise).resize((1000, 800), Image.BICUBIC))
    source = pyvips.Image.new_from_array(smooth)
    for size in [(250, 200), (303, 241), (97, 3), (1, 1), (1000, 800), (999, 801), (1002, 800)]:
        ours = lanczos_to_size(source, size)
        assert ours.dtype == np.uint8 and ours.shape == (size[1], size[0], 3)
    for size in [(250, 200), (303, 241), (62, 50)]:
        pil = np.asarray(Image.fromarray(smooth).resize(size, Image.LANCZOS)).astype(int)
        for precise, bias in ((True, 0.05), (False, 1.0)):
            diff = lanczos_to_size(source, size, precise=precise).astype(int) - pil
            inner = diff[6:-6, 6:-6]  # borders: vips copies the edge, PIL renormalises the kernel
            # PIL clips its uint8 intermediate between passes, so rare ringing pixels differ by a few levels
            assert abs(inner.mean()) <= bias and np.abs(inner).mean() < 1.0
            assert np.quantile(np.abs(inner), 0.99) <= 2


def test_precise_resample_clips_ringing_instead_of_wrapping():
    step = np.zeros((64, 256, 3), np.uint8)
    step[:, 128:] = 255
    out = lanczos_to_size(pyvips.Image.new_from_array(step), (100, 25)).astype(int)
    row = out[12, :, 0]
    assert row[:45].max() <= 2 and row[-45:].min() >= 253  # no wrapped 0<->255 pixels next to the edge
    assert 0 < row[49] < 255 and 0 < row[50] < 255  # the edge itself (at 49.5) is a ramp


def test_subifd_pyramid_with_16x_step_is_found(tmp_path):
    path = tmp_path / "steep.tif"
    image = tissue_image(1024, 1024)
    small = np.ascontiguousarray(image[::16, ::16])
    small[:4, :4] = (0, 255, 0)  # only in the reduced level
    common = dict(
        photometric="rgb",
        compression="zlib",
        tile=(64, 64),
        metadata=None,
        resolution=(20000, 20000),
        resolutionunit="CENTIMETER",
    )
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, subifds=1, **common)
        tw.write(small, subfiletype=1, **common)
    with open_slide(path) as slide:
        assert slide.info.level_count == 2 and slide.info.base_mag == 20.0
        thumb, scale = slide.thumbnail(max_size=64)
    assert thumb.shape == (64, 64, 3) and scale == 16.0
    assert thumb[0, 0, 1] > 200 and thumb[0, 0, 0] < 50


MAGS = (10.0, 5.0, 2.5, 1.25, 0.625)


@pytest.fixture(scope="module")
def textured_slide(tmp_path_factory):
    """40x lossless slide: smooth colour texture plus fine noise (so every filter tap matters), white margins."""
    rng = np.random.default_rng(5)
    coarse = (40 + rng.random((24, 32, 3)) * 175).astype(np.uint8)  # no saturation: PIL clips between passes
    image = np.asarray(Image.fromarray(coarse).resize((1536, 1152), Image.BICUBIC)).copy()
    image = np.clip(image.astype(int) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    image[:, :40] = 255
    path = tmp_path_factory.mktemp("textured") / "textured.tif"
    write_pyramid_tiff(path, image, mpp=0.25, subifds=False)
    return path, image


@pytest.mark.parametrize("box", [(37, 51, 1400, 1050), (-90, 700, 700, 600)])  # inside; partly off the slide
def test_read_at_mags_in_pieces_equals_each_mag_resampled_whole(textured_slide, monkeypatch, box):
    path, _ = textured_slide
    monkeypatch.setattr(resample, "FETCH_WINDOW", 480)  # several pieces, so piece borders cross every filter
    with open_slide(path) as slide:
        sizes = {mag: target_size(box[2:], slide.info.base_mag, mag) for mag in MAGS}
        together = slide.read_at_mags(box, sizes)
        assert set(together) == set(MAGS)
        x, y, w, h = box
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, slide.info.width), min(y + h, slide.info.height)
        whole = slide._level0_image().crop(x0, y0, x1 - x0, y1 - y0).embed(x0 - x, y0 - y, w, h, extend="white")
        for mag, (out_w, out_h) in sizes.items():
            assert together[mag].shape == (out_h, out_w, 3) and together[mag].dtype == np.uint8
            reference = lanczos_to_size(whole, (out_w, out_h))  # one pipeline over the whole box
            assert np.array_equal(together[mag], reference), mag  # bit-identical: no seams, no shifts
            assert np.array_equal(slide.read_at_mag(box, mag, (out_w, out_h)), reference)


def test_read_at_mags_matches_pil_lanczos_from_level0_without_bias(textured_slide):
    path, image = textured_slide
    box = (64, 64, 1408, 1024)
    crop = Image.fromarray(image[64 : 64 + 1024, 64 : 64 + 1408])
    with open_slide(path) as slide:
        sizes = {mag: target_size(box[2:], 40.0, mag) for mag in MAGS}
        together = slide.read_at_mags(box, sizes)
    for mag, size in sizes.items():
        diff = together[mag].astype(int) - np.asarray(crop.resize(size, Image.LANCZOS)).astype(int)
        inner = diff[3:-3, 3:-3]  # borders: vips copies the edge, PIL renormalises the kernel
        assert abs(inner.mean()) < 0.1 and np.abs(inner).mean() < 0.5, mag  # raw vips 8-bit: -0.8 .. -7
        assert np.quantile(np.abs(inner), 0.99) <= 2


def test_read_at_mags_keeps_markers_aligned_across_pieces(tmp_path, monkeypatch):
    """Markers on piece borders land at the scaled position at every mag (pixel-centre convention)."""
    image = np.full((1280, 1280, 3), 255, np.uint8)
    centres = [(299.5, 299.5), (608.5, 640.5), (1000.5, 201.5)]
    for cx, cy in centres:
        image[int(cy) - 15 : int(cy) + 17, int(cx) - 15 : int(cx) + 17] = 0
    path = tmp_path / "markers.tif"
    write_pyramid_tiff(path, image, mpp=0.25, subifds=False)
    monkeypatch.setattr(resample, "FETCH_WINDOW", 320)
    box = (0, 0, 1280, 1280)
    with open_slide(path) as slide:
        sizes = {mag: target_size(box[2:], 40.0, mag) for mag in MAGS[:3]}
        together = slide.read_at_mags(box, sizes)
    for mag, (out_w, out_h) in sizes.items():
        shrink = 1280 / out_w
        for cx, cy in centres:
            want_x, want_y = (cx + 0.5) / shrink - 0.5, (cy + 0.5) / shrink - 0.5
            r = 40 / shrink + 3
            x0, y0 = int(want_x - r), int(want_y - r)
            got_x, got_y = centroid_of_dark(together[mag][y0 : int(want_y + r) + 1, x0 : int(want_x + r) + 1])
            assert abs(x0 + got_x - want_x) <= 0.25 and abs(y0 + got_y - want_y) <= 0.25, (mag, cx, cy)


def test_read_at_mags_openslide_backend_agrees(svs):
    box = (150, 250, 1500, 1000)
    sizes = {mag: target_size(box[2:], 20.0, mag) for mag in (10.0, 2.5, 0.625)}
    with open_slide(svs) as fast, open_slide(svs, backend="openslide") as fallback:
        a, b = fast.read_at_mags(box, sizes), fallback.read_at_mags(box, sizes)
    for mag in sizes:
        assert np.abs(a[mag].astype(int) - b[mag].astype(int)).max() <= 1


def test_read_at_mags_rejects_bad_requests(svs):
    with open_slide(svs) as slide:
        with pytest.raises(SlideError, match="empty box"):
            slide.read_at_mags((0, 0, 100, 100), {})
        with pytest.raises(SlideError, match="exceeds the base magnification"):
            slide.read_at_mags((0, 0, 100, 100), {10.0: (50, 50), 40.0: (200, 200)})


def test_precise_resample_undoes_the_vips_fixed_point_gain_at_large_shrinks():
    rng = np.random.default_rng(3)
    noise = rng.integers(60, 190, (1024, 1024, 3)).astype(np.uint8)
    source = pyvips.Image.new_from_array(noise).copy(interpretation="srgb")
    pil = np.asarray(Image.fromarray(noise).resize((16, 16), Image.LANCZOS)).astype(int)[2:-2, 2:-2]
    raw = lanczos_to_size(source, (16, 16), precise=False).astype(int)[2:-2, 2:-2]
    ours = lanczos_to_size(source, (16, 16)).astype(int)[2:-2, 2:-2]
    assert (raw - pil).mean() < -2  # 64x: vips' integer masks sum to ~0.966 (what precise=True corrects)
    assert abs((ours - pil).mean()) < 0.1 and np.abs(ours - pil).max() <= 1


@pytest.mark.parametrize("size", [(250, 200), (303, 241), (31, 23)])  # shrink 4, ~3.3 (non-integer), ~32
def test_precise_second_pass_rounds_the_exact_float_sum_once(size):
    """The horizontal pass (integer-weight GEMM) against float64 Lanczos3 over the same 8-bit first pass."""
    rng = np.random.default_rng(4)
    pixels = np.asarray(Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).resize((1000, 800)))
    source = pyvips.Image.new_from_array(pixels)
    out_w, out_h = size
    first = source.reducev(800 / out_h, kernel="lanczos3").numpy().astype(float)  # vips' 8-bit first pass
    first /= resample._reducev_gain(800, 800 / out_h)[:, None, None]
    shrink = 1000 / out_w
    centre = (np.arange(out_w) + 0.5) * shrink - 0.5
    taps = np.arange(-int(3 * shrink) - 2, int(3 * shrink) + 3)
    x = np.floor(centre)[:, None] + taps  # (out_w, taps) input columns
    weights = np.where(
        np.abs(x - centre[:, None]) < 3 * shrink,
        np.sinc((x - centre[:, None]) / shrink) * np.sinc((x - centre[:, None]) / shrink / 3),
        0,
    )
    weights /= weights.sum(axis=1, keepdims=True)
    exact = np.einsum("rjkc,jk->rjc", first[:, np.clip(x, 0, 999).astype(int)], weights)  # edges extended
    exact = np.clip(exact, 0, 255)
    ours = lanczos_to_size(source, size).astype(float)
    assert np.abs(ours - exact).max() < 0.55  # one rounding of (nearly) the exact sum, never two
    assert abs((ours - exact).mean()) < 0.01
    start, fixed = resample.tap_weights(1000, out_w, 0, out_w)
    assert (fixed.sum(axis=1) == resample.WEIGHT_SCALE).all()
    assert (np.abs(fixed).sum(axis=1) * 255 < 2**24).all()  # integer sums stay exact in float32
