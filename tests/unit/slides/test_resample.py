"""Lanczos resampling: exact sizes, PIL agreement, ringing clipped, the fixed-point gain undone, one rounding."""

from __future__ import annotations

import numpy as np
import pytest
import pyvips
from PIL import Image

from hpcdistill.slides import resample
from hpcdistill.slides.resample import lanczos_to_size

BACKGROUND = 240


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
