"""Lanczos3 resampling of level-0 pixels to any smaller size, exactly and without bias.

Every magnification is resampled directly from level 0 (the paper: "every downsampling was obtained directly
from the original image"), never from a pyramid level or another magnification, so resamplings never compose.
Kept apart from the slide readers: it works on any lazy pyvips image, whichever backend decoded it.
Speed and precision figures: bench/README.md.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import numpy as np
import pyvips

# Bounded vips operation cache: slides are streamed, so a large cache only holds memory for nothing.
pyvips.cache_set_max_mem(256 * 1024 * 1024)
pyvips.cache_set_max(100)
pyvips.cache_set_max_files(20)

# vips `reduce` builds a kernel of ~6*shrink taps and refuses large shrinks; beyond this a box pre-shrink is used.
MAX_LANCZOS_SHRINK = 256.0
# Undo the gain of vips' fixed-point Lanczos masks (see lanczos_to_size); False: raw vips 8-bit output.
PRECISE_RESAMPLE = True
# Tile (w, h) of the cache between the vertical and horizontal Lanczos passes (5 rows of them are kept).
PASS_CACHE_TILE = (512, 32)
# ushort level of the constant line the per-pixel filter gain is measured on (read to ~1e-5).
GAIN_PROBE = 32768
# Largest level-0 piece side (px) read_at_mags decodes into memory at once (plus filter margins): bounds memory.
FETCH_WINDOW = 6144


@functools.lru_cache(maxsize=512)
def _reducev_gain(length: int, shrink: float) -> np.ndarray:
    """Per-output-row gain (the sum of the fixed-point Lanczos3 weights) of vips reducev over `length` rows,
    measured by filtering a constant ushort column; uchar uses the same integer masks."""
    column = (pyvips.Image.black(1, length) + GAIN_PROBE).cast("ushort")
    gain = column.reducev(shrink, kernel="lanczos3").numpy().reshape(-1).astype(np.float32) / GAIN_PROBE
    gain.flags.writeable = False  # cached: shared between callers
    return gain


def lanczos_to_size(image: pyvips.Image, size: tuple[int, int], precise: bool = PRECISE_RESAMPLE) -> pyvips.Image:
    """Lanczos3-resample `image` to exactly `size` (w, h), lazily (nothing is computed until pixels are asked for).

    vips `resize` box-pre-shrinks before its Lanczos pass, so reducev + reduceh are used for downsampling; each
    output length is round(in / shrink), and any float off-by-one is fixed by copying/cropping the edge pixel.

    `precise` (8-bit input): vips' 8-bit darkening is not rounding but a pure gain: its integer masks sum to
    less than 1, more so the larger the shrink. Dividing the gain out of an 8-bit result cannot work (the output
    was already rounded, so small corrections round back to the same value). So the costly first pass (reducev
    over all level-0 rows) runs in vips' fast 8-bit fixed point, its gain is measured once per (length, shrink)
    on a constant column; the second pass, over shrink-times fewer pixels, runs in float, and the first-pass
    gain is divided out before the single final rounding. Unbiased against PIL LANCZOS at a fraction of the
    cost of an all-float filter (figures in bench/README.md). precise=False: vips' plain 8-bit path.
    """
    out_w, out_h = size
    hshrink, vshrink = image.width / out_w, image.height / out_h
    if hshrink < 1.0 or vshrink < 1.0:
        # Only from rounding at mag == base_mag (a pixel or two); reduce cannot enlarge.
        image = image.resize(1.0 / hshrink, vscale=1.0 / vshrink, kernel="lanczos3")
    else:
        if hshrink > MAX_LANCZOS_SHRINK or vshrink > MAX_LANCZOS_SHRINK:
            pre_h = max(1, math.ceil(hshrink / MAX_LANCZOS_SHRINK))
            pre_v = max(1, math.ceil(vshrink / MAX_LANCZOS_SHRINK))
            image = image.shrink(pre_h, pre_v)
            hshrink, vshrink = image.width / out_w, image.height / out_h
        correct = precise and image.format == "uchar"
        gain = None
        if vshrink > 1.0:
            if correct:
                gain = _reducev_gain(image.height, vshrink)
            image = image.reducev(vshrink, kernel="lanczos3")
            if hshrink > 1.0:  # reduceh asks for overlapping strips: uncached, reducev recomputes them (4x at 64x)
                across = math.ceil(image.width / PASS_CACHE_TILE[0]) + 1
                image = image.tilecache(tile_width=PASS_CACHE_TILE[0], tile_height=PASS_CACHE_TILE[1],
                                        max_tiles=5 * across, threaded=True)
        if correct:
            image = image.cast("float")
        if hshrink > 1.0:
            image = image.reduceh(hshrink, kernel="lanczos3")
        if correct:
            if gain is not None and gain.min() == gain.max():  # every integer shrink: one gain for all rows
                image = image.linear(1.0 / float(gain[0]), 0.0)
            elif gain is not None:
                image = image * pyvips.Image.new_from_array((1.0 / gain)[:, None]).replicate(image.width, 1)
            image = image.rint().cast("uchar")  # cast clips ringing to 0..255
    if (image.width, image.height) != (out_w, out_h):
        image = image.embed(0, 0, out_w, out_h, extend="copy")
    return image


def _even_steps(length: int, most: int) -> list[tuple[int, int]]:
    """[start, stop) pieces of 0..length, as few as keep each <= most, of near-equal size (margins cost less)."""
    count = math.ceil(length / most)
    return [(length * i // count, length * (i + 1) // count) for i in range(count)]


def _output_span(start: int, stop: int, total: int, out_len: int) -> tuple[int, int]:
    """Output pixels [a, b) whose centres come from level-0 [start, stop) of `total`; consecutive spans tile."""
    return round(start * out_len / total), (out_len if stop >= total else round(stop * out_len / total))


def resample_together(source: pyvips.Image, sizes: Mapping[float, tuple[int, int]],
                      window: int | None = None) -> dict[float, np.ndarray]:
    """Lanczos3-resample one lazy uchar image (a level-0 box) to every size in {key: (w, h)}, decoding it once.

    The box is cut into near-equal pieces of at most `window` (default FETCH_WINDOW) px a side. Each piece,
    grown by the widest filter's support (4 x the largest shrink), is decoded into memory once and embedded at
    its place in an otherwise black box-size frame; every size is then resampled from that frame by the same
    whole-box pipeline (lanczos_to_size) and only the output block whose pixel centres lie in the piece is
    computed. An output pixel reads only level-0 pixels within its filter support, all of which are real here,
    so the blocks are exactly the whole-box result and tile without seams; memory is bounded by the piece size.
    """
    window = window or FETCH_WINDOW
    box_w, box_h = source.width, source.height
    shrink = max(max(box_w / w, box_h / h) for w, h in sizes.values())
    margin = math.ceil(3 * max(shrink, 1.0)) + 4  # Lanczos3 reads 3 x shrink px each side; + the block's rounding
    outs = {key: np.empty((h, w, source.bands), dtype=np.uint8) for key, (w, h) in sizes.items()}
    for y, y_end in _even_steps(box_h, window):
        for x, x_end in _even_steps(box_w, window):
            x0, y0 = max(0, x - margin), max(0, y - margin)
            x1, y1 = min(box_w, x_end + margin), min(box_h, y_end + margin)
            frame = source.crop(x0, y0, x1 - x0, y1 - y0).copy_memory().embed(x0, y0, box_w, box_h)
            for key, (w, h) in sizes.items():
                ox0, ox1 = _output_span(x, x_end, box_w, w)
                oy0, oy1 = _output_span(y, y_end, box_h, h)
                if ox1 > ox0 and oy1 > oy0:  # vips' own sink: small cache-friendly tiles, VIPS_CONCURRENCY threads
                    data = lanczos_to_size(frame, (w, h)).crop(ox0, oy0, ox1 - ox0, oy1 - oy0).write_to_memory()
                    outs[key][oy0:oy1, ox0:ox1] = np.frombuffer(data, np.uint8).reshape(oy1 - oy0, ox1 - ox0, -1)
    return outs
