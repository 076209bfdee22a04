"""Reading from the pyramid: a scanner-like synthetic SVS (each level the one above shrunk with an area filter and
JPEG-encoded again), crops read from the smallest level at or above each magnification, only that level decoded;
and metadata that disagrees with itself said in one line."""

from __future__ import annotations

import numpy as np
import pytest

from hpcdistill.common.errors import SlideError
from hpcdistill.slides.factory import open_slide
from hpcdistill.slides.mag_scale import OBJECTIVE_SCALE
from hpcdistill.slides.metadata import metadata_conflicts
from hpcdistill.slides.windows import window_sizes
from hpcdistill.synthetic.dataset import write_slide
from hpcdistill.synthetic.specs import SlideSpec


@pytest.fixture(scope="module")
def scanner_svs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pyramid") / "scanner.svs"
    info = write_slide(path, SlideSpec(8192, 6144, fmt="svs", base_mag=40, seed=3, tissues=2, pyramid="scanner"))
    return path, info


def test_scanner_levels_are_the_level_above_shrunk_and_reencoded(scanner_svs):
    path, info = scanner_svs
    assert info["levels"] == [(8192, 6144), (2048, 1536), (512, 384), (128, 96)] and info["pyramid"] == "scanner"
    with open_slide(path) as slide:
        mags = [round(level.magnification(40), 6) for level in slide.levels()]
        above = slide._level_image(0).crop(0, 0, 4096, 4096).numpy().astype(np.float64)
        level1 = slide._level_image(1).crop(0, 0, 1024, 1024).numpy().astype(np.float64)
    assert mags == [40.0, 10.0, 2.5, 0.625]
    area = above.reshape(1024, 4, 1024, 4, 3).mean(axis=(1, 3))
    assert np.abs(level1 - area).mean() < 1.5  # one more JPEG generation, nothing else


@pytest.mark.parametrize(("mag", "level"), [(10.0, 1), (5.0, 1), (2.5, 2), (1.25, 2)])
def test_a_pyramid_read_decodes_only_the_level_that_fits(scanner_svs, mag, level):
    path, info = scanner_svs
    box = tuple(int(v) for v in info["tissue_boxes"][0])
    with open_slide(path) as slide:
        size = window_sizes(box, 40.0, [mag])[mag]
        from_pyramid = slide.read_at_mag(box, mag, size, source="pyramid")
        assert set(slide.decoded_pixels) == {level} and slide.decoded_pixels[level] > 0  # no level-0 pixel
        slide.decoded_pixels.clear()
        from_level0 = slide.read_at_mag(box, mag, size)
        assert set(slide.decoded_pixels) == {0}
    assert from_pyramid.shape == from_level0.shape == (size[1], size[0], 3)
    # the same tissue, through the scanner's filter and JPEG instead of Lanczos from level 0
    assert np.abs(from_pyramid.astype(int) - from_level0.astype(int)).mean() < 4


def test_several_mags_group_by_level_and_match_single_reads(scanner_svs):
    path, info = scanner_svs
    box = tuple(int(v) for v in info["tissue_boxes"][1])
    sizes = window_sizes(box, 40.0, [10.0, 2.5])
    with open_slide(path) as slide:
        together = slide.read_at_mags(box, sizes, source="pyramid")
        assert set(slide.decoded_pixels) == {1, 2}
        alone = {mag: slide.read_at_mag(box, mag, size, source="pyramid") for mag, size in sizes.items()}
        with pytest.raises(SlideError, match=r"read source 'tiles'.*level0, pyramid"):
            slide.read_at_mags(box, sizes, source="tiles")
    assert all(np.array_equal(together[mag], alone[mag]) for mag in sizes)


def test_disagreeing_magnification_metadata_is_said_in_one_line(tmp_path, capfd):
    path = tmp_path / "stale.svs"
    write_slide(
        path, SlideSpec(1024, 768, fmt="svs", base_mag=40, mpp=1.0, seed=1, tissues=1)
    )  # AppMag 40, MPP 1.0 = 10x
    with open_slide(path) as slide:  # a magnification is a pixel size: the pixels say 10x
        assert slide.info.base_mag == 10.0 and slide.info.mag_source == "mpp"
    (line,) = [ln for ln in capfd.readouterr().err.splitlines() if "disagree" in ln]
    assert str(path) in line and "40x" in line and "1 um/px (10x)" in line and "using 10x (mpp)" in line
    with open_slide(path, scale=OBJECTIVE_SCALE) as slide:  # as folders were cut before: the objective power
        assert slide.info.base_mag == 40.0 and slide.info.mag_source == "objective-power"
    assert "using 40x (objective-power)" in capfd.readouterr().err
    with open_slide(path, base_mag=10) as slide:  # --base-mag overrides, and the line says so
        assert slide.info.base_mag == 10.0 and "using 10x (override)" in slide.info.notes[0]


def test_a_stale_aperio_size_is_named():
    header = "Aperio Image Library v12.0.15\r\n46000x32914 [0,100 46000x32914] (256x256) JPEG/RGB Q=70|AppMag = 40"
    (note,) = metadata_conflicts({}, header, None, (23000, 16457), (40.0, "objective-power"))
    assert "46000x32914" in note and "23000x16457" in note and "using 40x (objective-power)" in note
    assert metadata_conflicts({}, header, None, (46000, 32914), (40.0, "objective-power")) == []


@pytest.mark.parametrize("backend", ["vips", "openslide"])
def test_the_aperio_svs_is_read_from_its_reduced_level(svs, backend):
    """The true Aperio layout (20x, a /4 level whose top-left 8x8 px alone are green): a 5x read comes from that
    level, with either backend."""
    with open_slide(svs, backend=backend) as slide:
        assert [round(level.magnification(20), 6) for level in slide.levels()] == [20.0, 5.0]
        pixels = slide.read_at_mag((0, 0, 256, 256), 5.0, (64, 64), source="pyramid")
        assert set(slide.decoded_pixels) == {1}
        level0 = slide.read_at_mag((0, 0, 256, 256), 5.0, (64, 64))
    green = pixels[:6, :6].astype(int)
    assert (green[..., 1] - green[..., 0]).mean() > 100  # the marker only the reduced level holds
    assert (level0[:6, :6, 1].astype(int) - level0[:6, :6, 0]).mean() < 50
