"""Opening slides: true Aperio SVS and pyramidal TIFF metadata, the base magnification, one-line errors for
truncated, corrupt and foreign files, pyramid levels, backends that agree."""

from __future__ import annotations

import logging

import numpy as np
import openslide
import pytest
import tifffile
from conftest import write_svs
from slide_fixtures import assert_one_line_error, tissue_image, write_pyramid_tiff

from hpcdistill.common.errors import SlideError
from hpcdistill.slides.factory import open_slide
from hpcdistill.slides.mag_scale import OBJECTIVE_SCALE
from hpcdistill.slides.metadata import mag_from_mpp

BACKGROUND = 240


def test_svs_is_a_true_aperio_layout_and_metadata_is_read(svs):
    with openslide.OpenSlide(svs) as osr:  # the file is what OpenSlide calls Aperio, with its associated images
        assert osr.properties["openslide.vendor"] == "aperio"
        assert set(osr.associated_images) == {"thumbnail", "label", "macro"}
    with open_slide(svs) as slide:
        info = slide.info
        assert (info.width, info.height) == (2100, 1500)
        assert info.base_mag == 20.04 and info.mag_source == "mpp"  # 10 / 0.499 um/px: the pixel size rules
    with open_slide(svs, scale=OBJECTIVE_SCALE) as slide:  # as before the option: the AppMag
        assert slide.info.base_mag == 20.0 and slide.info.mag_source == "objective-power"
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


def test_vips_and_openslide_backends_agree(svs):
    box, size = (150, 250, 1500, 1000), (375, 250)
    with open_slide(svs) as fast, open_slide(svs, backend="openslide") as fallback:
        a = fast.read_at_mag(box, 5.0, size).astype(int)
        b = fallback.read_at_mag(box, 5.0, size).astype(int)
    assert np.abs(a - b).max() <= 1


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
