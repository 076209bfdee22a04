"""tissue.py on synthetic thumbnails and on a real SVS written with tifffile."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_svs
from PIL import Image
from scipy import ndimage

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.slides.factory import open_slide
from hpcdistill.slides.tissue import (
    TissueParams,
    disk,
    find_tissue_boxes,
    ink_mask,
    otsu_threshold,
    tissue_channel,
    tissue_mask,
    write_qc_png,
)

PINK, PURPLE = (225, 150, 190), (120, 60, 150)


def slide_thumb(height: int = 300, width: int = 400, seed: int = 0) -> np.ndarray:
    """White glass with faint noise, a pink blob lower right and a purple blob upper left, and a speck."""
    rng = np.random.default_rng(seed)
    thumb = np.full((height, width, 3), 236, np.int16) + rng.integers(-4, 5, (height, width, 3))
    yy, xx = np.mgrid[:height, :width]
    thumb[(xx - 300) ** 2 / 60**2 + (yy - 200) ** 2 / 50**2 <= 1] = PINK  # bbox x 240..360, y 150..250
    thumb[40:100, 50:130] = PURPLE
    thumb[10:12, 390:392] = PURPLE  # 4-px speck: removed
    return np.clip(thumb, 0, 255).astype(np.uint8)


def contains(outer, inner) -> bool:
    ox, oy, ow, oh = outer
    ix, iy, iw, ih = inner
    return ox <= ix and oy <= iy and ox + ow >= ix + iw and oy + oh >= iy + ih


@pytest.mark.parametrize("channel", ["saturation", "grey"])
def test_two_blobs_give_two_sorted_level0_boxes(channel):
    scale = 16.0
    boxes = find_tissue_boxes(slide_thumb(), scale, TissueParams(channel=channel, pad_frac=0.05))
    assert len(boxes) == 2
    purple, pink = boxes  # sorted top-to-bottom: purple (y 40) before pink (y 150)
    assert contains(purple, (50 * 16, 40 * 16, 80 * 16, 60 * 16))
    assert contains(pink, (241 * 16, 151 * 16, 118 * 16, 98 * 16))
    # padding is modest: 5% of the long side per side, plus one thumbnail pixel of rounding
    assert purple[2] <= (80 + 2 * 0.05 * 80 + 2) * 16 and purple[0] >= (50 - 0.05 * 80 - 1) * 16


def test_boxes_are_clipped_to_the_slide_and_sorted_left_to_right_on_a_row():
    thumb = np.full((100, 200, 3), 245, np.uint8)
    thumb[0:40, 150:200] = PINK  # touches the top-right corner
    thumb[0:40, 10:60] = PINK
    boxes = find_tissue_boxes(thumb, 10.0, TissueParams(pad_frac=0.2), slide_size=(1995, 1000))
    assert [b[0] < 1000 for b in boxes] == [True, False]  # left one first
    right = boxes[1]
    assert right[1] == 0 and right[0] + right[2] == 1995  # clipped to the slide, not to the thumbnail


@pytest.mark.parametrize("value", [255, 240, 0])
def test_blank_slides_have_no_tissue(value):
    thumb = np.full((120, 160, 3), value, np.uint8)
    assert find_tissue_boxes(thumb, 8.0, TissueParams()) == []
    noisy = np.clip(thumb.astype(int) + np.random.default_rng(3).integers(-2, 3, thumb.shape), 0, 255)
    assert find_tissue_boxes(noisy.astype(np.uint8), 8.0, TissueParams(channel="grey")) == []


def test_small_objects_and_thin_debris_are_removed():
    thumb = slide_thumb()
    mask = tissue_mask(thumb, TissueParams())
    assert not mask[5:15, 385:395].any()  # the speck
    assert mask[70, 90] and mask[200, 300]  # both blobs
    kept_small = tissue_mask(thumb, TissueParams(open_radius=0, min_area_frac=0.0))
    assert kept_small[10:12, 390:392].any()  # it is the filtering that removes it


def test_fast_channels_and_morphology_equal_the_plain_definitions():
    rng = np.random.default_rng(7)
    thumb = rng.integers(0, 256, (60, 80, 3)).astype(np.uint8)
    rgb = thumb.astype(np.int64)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    assert (tissue_channel(thumb, "saturation") == (high - low) * 255 // np.maximum(high, 1)).all()
    grey = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114 + 500) // 1000
    assert (tissue_channel(thumb, "grey") == 255 - grey).all()
    # libvips close/open by a disk == scipy's, given enough edge padding for scipy's zero border
    blobs = ndimage.gaussian_filter(rng.random((120, 160)), 3) > 0.5
    colour = np.where(blobs[..., None], np.array(PINK, np.uint8), np.uint8(240))
    params = TissueParams(close_radius=4, open_radius=2, min_area_frac=0.0)
    padded = np.pad(blobs, 12, mode="edge")
    expected = ndimage.binary_opening(ndimage.binary_closing(padded, disk(4)), disk(2))[12:-12, 12:-12]
    assert blobs.mean() > 0.2 and (tissue_mask(colour, params) == expected).all()


def test_otsu_separates_two_modes():
    values = np.concatenate([np.full(500, 30), np.full(300, 200)]).astype(np.uint8)
    assert 30 <= otsu_threshold(values) < 200


def test_params_are_validated():
    with pytest.raises(HpcdistillError, match="channel"):
        TissueParams(channel="hue")
    with pytest.raises(HpcdistillError, match="pad_frac"):
        TissueParams(pad_frac=-1)


GREEN_INK, BLUE_INK = (20, 140, 70), (35, 65, 185)  # marker colours as scanned (hue ~143 and ~228 degrees)


def with_pen_marks(thumb: np.ndarray) -> np.ndarray:
    """A green stroke and a blue tick on the glass, and a green stroke across the pink tissue."""
    out = thumb.copy()
    out[250:258, 20:200] = GREEN_INK
    out[150:200, 180:188] = BLUE_INK
    out[195:201, 250:350] = GREEN_INK
    return out


def test_pen_marks_are_not_tissue():
    clean, inked = slide_thumb(), with_pen_marks(slide_thumb())
    assert len(find_tissue_boxes(inked, 16.0, TissueParams(drop_ink=False))) > 2  # the strokes become "tissue"
    assert find_tissue_boxes(inked, 16.0, TissueParams()) == find_tissue_boxes(clean, 16.0, TissueParams())
    mask = tissue_mask(inked, TissueParams())
    assert mask[190:210, 260:340].all()  # the stroke over the tissue is closed over, not cut out
    # stains, incl. dense hematoxylin and the bluest, most saturated nucleus pixel of the demo slides (hue 233)
    stains = np.array([PINK, PURPLE, (133, 127, 191), (70, 63, 143), (90, 60, 140), (50, 60, 165)], np.uint8)[None]
    assert not ink_mask(stains).any() and ink_mask(np.array([[GREEN_INK, BLUE_INK]], np.uint8)).all()


def test_qc_png_draws_the_boxes(tmp_path):
    thumb = slide_thumb()
    boxes = find_tissue_boxes(thumb, 4.0, TissueParams())
    path = tmp_path / "qc" / "slide.png"
    write_qc_png(path, thumb, boxes, 4.0, labels=["t0", "t1"], colors=[(0, 0, 255), (255, 0, 0)])
    drawn = np.asarray(Image.open(path).convert("RGB"))
    assert drawn.shape == thumb.shape
    x, y, w, h = boxes[0]
    assert tuple(drawn[y // 4 + h // 8, x // 4]) == (0, 0, 255)  # left edge of the first box
    x, y, w, h = boxes[1]
    assert tuple(drawn[y // 4 + h // 8, x // 4]) == (255, 0, 0)
    assert not list(tmp_path.glob("qc/*.partial"))
    with pytest.raises(HpcdistillError, match="labels"):
        write_qc_png(path, thumb, boxes, 4.0, labels=["only one"])


def test_qc_png_has_a_title_and_legend_in_readable_text(tmp_path):
    from hpcdistill.slides.tissue import find_tissues, text_size, tissue_threshold

    thumb = slide_thumb()
    boxes, labels, owners, threshold = find_tissues(thumb, 4.0, TissueParams())
    assert len(owners) == len(boxes) and all((labels == o).any() for o in owners)  # each box has its own mask
    assert threshold == tissue_threshold(thumb, TissueParams())  # the one finer outlines are cut at
    path = tmp_path / "legend.png"
    write_qc_png(
        path,
        thumb,
        boxes,
        4.0,
        labels=["t0", "t1"],
        title="slide: 2 tissues",
        legend=[("t0", (0, 160, 0)), ("t1", (0, 90, 255))],
    )
    drawn = np.asarray(Image.open(path).convert("RGB"))
    band = drawn[thumb.shape[0] :]
    assert drawn.shape[1] == thumb.shape[1] and band.shape[0] >= 2 * text_size(Image.fromarray(thumb))
    assert (band == (0, 160, 0)).all(axis=2).sum() > 100 and (band < 60).all(axis=2).sum() > 20  # swatch, text
    assert text_size(Image.fromarray(thumb)) >= 14


def test_tissue_on_a_real_svs(tmp_path):
    image = np.full((1200, 1600, 3), 238, np.uint8)
    image[100:500, 200:700] = PINK
    image[700:1100, 900:1500] = PURPLE
    image[1150:1170, 100:1400] = GREEN_INK  # an annotation line on the glass
    path = tmp_path / "two.svs"
    write_svs(path, image)
    with open_slide(path) as slide:
        thumb, scale = slide.thumbnail(max_size=256)
        boxes = find_tissue_boxes(thumb, scale, TissueParams(), slide_size=(slide.info.width, slide.info.height))
    assert len(boxes) == 2
    assert contains(boxes[0], (210, 110, 480, 380)) and contains(boxes[1], (910, 710, 580, 380))
    for x, y, w, h in boxes:
        assert x >= 0 and y >= 0 and x + w <= 1600 and y + h <= 1200
        assert w < 700 and h < 500  # tight-ish: not the whole slide
