"""Reading regions at a magnification: markers land where they should, edges and limits, every magnification from
one decode equal to each resampled whole and to PIL's Lanczos from level 0."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from slide_fixtures import write_pyramid_tiff

from hpcdistill.common.errors import SlideError
from hpcdistill.slides import resample
from hpcdistill.slides.factory import open_slide
from hpcdistill.slides.resample import lanczos_to_size
from hpcdistill.slides.slide import target_size

BACKGROUND = 240


MAGS = (10.0, 5.0, 2.5, 1.25, 0.625)


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
        whole = slide._level_image(0).crop(x0, y0, x1 - x0, y1 - y0).embed(x0 - x, y0 - y, w, h, extend="white")
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
