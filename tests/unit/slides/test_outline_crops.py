"""Outlines traced per tissue within its box (slides/outlines.py) are exactly those of the whole mask: the crop only
saves work. And the fine mask looks for ink only where the threshold found tissue, with the same result."""

from __future__ import annotations

import numpy as np
import shapely

from hpcdistill.slides.outlines import _crop, mask_polygons
from hpcdistill.slides.tissue import TissueParams, fine_tissue_mask, ink_mask, tissue_channel


def blobs() -> np.ndarray:
    mask = np.zeros((300, 400), bool)
    mask[40:160, 50:200] = True
    mask[80:120, 100:140] = False  # a lumen
    mask[200:290, 250:390] = True
    mask[210, 260:380] = False  # a crack one pixel wide
    return mask


def test_a_tissue_traced_in_its_box_equals_it_traced_on_the_whole_mask():
    mask, scale, wh = blobs(), 12.5, (5000, 3750)
    whole = mask_polygons(mask, scale=scale, slide_wh=wh)
    boxes = [(50 * scale, 40 * scale, 150 * scale, 120 * scale), (250 * scale, 200 * scale, 140 * scale, 90 * scale)]
    parts = []
    for box in boxes:
        own = np.zeros_like(mask)
        x, y, w, h = (round(v / scale) for v in box)
        own[y : y + h, x : x + w] = mask[y : y + h, x : x + w]
        crop, origin = _crop(own, box, scale)
        assert crop.size < own.size / 3  # the point: a fraction of the work
        alone = mask_polygons(own, scale=scale, slide_wh=wh)
        cropped = mask_polygons(crop, origin, scale=scale, slide_wh=wh)
        assert shapely.equals_exact(alone, cropped, 0), box  # the same vertices, not only the same area
        parts.append(cropped)
    assert shapely.union_all(parts).symmetric_difference(whole).area == 0


def test_ink_sought_only_in_tissue_gives_the_same_mask():
    rng = np.random.default_rng(0)
    thumb = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    thumb[:, :40] = (40, 200, 80)  # a green pen stroke: tissue by saturation, ink by hue
    params = TissueParams()
    threshold = 60.0
    expected = (tissue_channel(thumb, params.channel) > threshold) & ~ink_mask(thumb)
    assert (fine_tissue_mask(thumb, threshold, params) == expected).all()
    assert not fine_tissue_mask(thumb, threshold, params)[:, :40].any()
