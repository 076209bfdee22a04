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
# Undo the gain of vips' fixed-point Lanczos masks with an exact second pass (see lanczos_block); False: raw vips
# 8-bit output.
PRECISE_RESAMPLE = True
# Tile (w, h) of the cache on first-pass (reducev) output (5 rows of them are kept): between vips' own passes, and
# before the exact second pass when one output row's taps span more than PASS1_CACHE_BYTES (vips then filters
# narrow columns that stay in cache: 3x faster at 64x than whole rows).
PASS_CACHE_TILE = (512, 32)
PASS1_CACHE_BYTES = 2 << 20
# Exact second pass: output pixels per GEMM block (fewer waste fewer multiply-adds on the block's zero weights),
# weight fixed point (integer weights x uint8 stay exact in float32: 255 * 1.3 * 2**15 < 2**24), rows per GEMM.
H_BLOCK = 4
WEIGHT_SCALE = 1 << 15
ROW_CHUNK = 128
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


def _lanczos3(x: np.ndarray) -> np.ndarray:
    """sinc(x) sinc(x / 3) on |x| < 3, else 0 (one sine each, not np.sinc's two divisions)."""
    x = np.where(np.abs(x) < 3.0, x, 3.0)  # sin(pi * 3) == 0 up to rounding: zeroed below
    near = np.abs(x) < 1e-8
    angle = np.pi * np.where(near, 1.0, x)
    out = 3.0 * np.sin(angle) * np.sin(angle / 3.0) / (angle * angle)
    out[near] = 1.0
    out[np.abs(x) >= 3.0] = 0.0
    return out


def _fixed_point(weights: np.ndarray) -> np.ndarray:
    """Rows of float weights that sum to 1 -> integers that sum to exactly WEIGHT_SCALE (largest remainders)."""
    scaled = weights * WEIGHT_SCALE
    whole = np.floor(scaled)
    short = np.rint(WEIGHT_SCALE - whole.sum(axis=1)).astype(np.int64)  # 0 .. taps
    order = np.argsort(whole - scaled, axis=1, kind="stable")  # largest remainder first
    bump = np.empty(whole.shape, bool)
    np.put_along_axis(bump, order, np.arange(whole.shape[1]) < short[:, None], axis=1)
    return whole + bump


def tap_weights(in_len: int, out_len: int, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos3 taps of output pixels first..stop-1 when `in_len` pixels shrink to `out_len` (>= 1x): the first
    input index of each (may be < 0 or run past the end: edges are extended) and (outputs, taps) integer weights
    summing to WEIGHT_SCALE. Pixel centres map as PIL's: output j samples input (j + 0.5) * shrink - 0.5."""
    shrink = in_len / out_len
    centre = (np.arange(first, stop) + 0.5) * shrink - 0.5
    start = np.floor(centre - 3.0 * shrink).astype(np.int64) + 1
    taps = int(6.0 * shrink) + 2  # every x with |x - centre| < 3 * shrink
    weights = _lanczos3((start[:, None] + np.arange(taps) - centre[:, None]) / shrink)
    return start, _fixed_point(weights / weights.sum(axis=1, keepdims=True))


def _horizontal_plan(in_w: int, out_w: int, first: int, stop: int, bands: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Output pixels first..stop-1 in blocks of H_BLOCK, as one dense GEMM operand per block:
    (start input column of each block, (blocks, span*bands, H_BLOCK*bands) float32 weights, span)."""
    start, weights = tap_weights(in_w, out_w, first, stop)
    n_out, taps = weights.shape
    blocks = -(-n_out // H_BLOCK)
    pad = blocks * H_BLOCK - n_out  # the last block's missing outputs: zero weights, sliced off after the GEMM
    start = np.concatenate([start, np.full(pad, start[-1])])
    weights = np.concatenate([weights, np.zeros((pad, taps))])
    block_start = start[::H_BLOCK]
    span = int((start.reshape(blocks, H_BLOCK).max(axis=1) - block_start).max()) + taps
    kernels = np.zeros((blocks, span * bands, H_BLOCK * bands), np.float32)
    out_index = np.arange(blocks * H_BLOCK)
    block = (out_index // H_BLOCK)[:, None]
    row = (start - block_start[block[:, 0]])[:, None] + np.arange(taps)
    col = (out_index % H_BLOCK)[:, None]
    for band in range(bands):  # channels stay interleaved: each band's weights on its own rows and columns
        kernels[block, row * bands + band, col * bands + band] = weights
    return block_start, kernels, span


def lanczos_block(
    image: pyvips.Image,
    size: tuple[int, int],
    block: tuple[int, int, int, int] | None = None,
    precise: bool = PRECISE_RESAMPLE,
) -> np.ndarray:
    """Lanczos3-resample `image` to exactly `size` (w, h) and return the output pixels in `block` (x0, y0, x1, y1;
    default all) as an (h, w, bands) array; only the level-0 pixels under the block are read.

    vips `resize` box-pre-shrinks before its Lanczos pass, so the two passes are done here. The costly first
    pass (reducev over all level-0 rows) runs in vips' fast 8-bit fixed point. `precise` (8-bit input): vips'
    8-bit darkening is not rounding but a pure gain (its integer masks sum to less than 1, more so the larger
    the shrink), and dividing a gain out of an 8-bit result cannot work (small corrections round back to the
    same value). So the first pass's gain is measured once per (length, shrink) on a constant column and divided
    out after the second pass, which is an exact integer-weighted GEMM (_horizontal_gemm): one rounding, no
    bias against PIL LANCZOS, at 1.5-2x vips' 8-bit time (figures: bench/README.md).
    precise=False: vips' plain 8-bit path.
    """
    out_w, out_h = size
    x0, y0, x1, y1 = block or (0, 0, out_w, out_h)
    hshrink, vshrink = image.width / out_w, image.height / out_h
    if hshrink < 1.0 or vshrink < 1.0:
        # Only from rounding at mag == base_mag (a pixel or two); reduce cannot enlarge.
        image = image.resize(1.0 / hshrink, vscale=1.0 / vshrink, kernel="lanczos3")
        return _vips_block(image, size, (x0, y0, x1, y1))
    if hshrink > MAX_LANCZOS_SHRINK or vshrink > MAX_LANCZOS_SHRINK:
        image = image.shrink(
            max(1, math.ceil(hshrink / MAX_LANCZOS_SHRINK)), max(1, math.ceil(vshrink / MAX_LANCZOS_SHRINK))
        )
        hshrink, vshrink = image.width / out_w, image.height / out_h
    if not (precise and image.format == "uchar"):
        return _vips_block(_vips_lanczos(image, size), size, (x0, y0, x1, y1))
    vertical, gain = image, np.ones(out_h, np.float32)
    if vshrink > 1.0:
        vertical, gain = image.reducev(vshrink, kernel="lanczos3"), _reducev_gain(image.height, vshrink)
        if 6 * vshrink * (x1 - x0) * hshrink * image.bands > PASS1_CACHE_BYTES:  # bytes one output row reads
            vertical = _pass_cache(vertical)
    return _horizontal_gemm(vertical, out_w, (x0, y0, x1, y1), 1.0 / (WEIGHT_SCALE * gain))


def lanczos_to_size(image: pyvips.Image, size: tuple[int, int], precise: bool = PRECISE_RESAMPLE) -> np.ndarray:
    """Lanczos3-resample `image` to exactly `size` (w, h) -> (h, w, bands) array (see lanczos_block)."""
    return lanczos_block(image, size, precise=precise)


def _vips_lanczos(image: pyvips.Image, size: tuple[int, int]) -> pyvips.Image:
    """vips' own 8-bit two-pass Lanczos3 to `size` (lazy), with a tile cache between the passes."""
    out_w, out_h = size
    hshrink, vshrink = image.width / out_w, image.height / out_h
    if vshrink > 1.0:
        image = image.reducev(vshrink, kernel="lanczos3")
        if hshrink > 1.0:  # reduceh asks for overlapping strips: uncached, reducev recomputes them (4x at 64x)
            image = _pass_cache(image)
    if hshrink > 1.0:
        image = image.reduceh(hshrink, kernel="lanczos3")
    return image


def _pass_cache(image: pyvips.Image) -> pyvips.Image:
    across = math.ceil(image.width / PASS_CACHE_TILE[0]) + 1
    return image.tilecache(
        tile_width=PASS_CACHE_TILE[0], tile_height=PASS_CACHE_TILE[1], max_tiles=5 * across, threaded=True
    )


def _vips_block(image: pyvips.Image, size: tuple[int, int], block: tuple[int, int, int, int]) -> np.ndarray:
    """The block (x0, y0, x1, y1) of a lazy image that should be `size`, any float off-by-one fixed by copying
    the edge pixel."""
    if (image.width, image.height) != size:
        image = image.embed(0, 0, size[0], size[1], extend="copy")
    x0, y0, x1, y1 = block
    return image.crop(x0, y0, x1 - x0, y1 - y0).numpy().reshape(y1 - y0, x1 - x0, image.bands)


def _horizontal_gemm(
    vertical: pyvips.Image, out_w: int, block: tuple[int, int, int, int], row_scale: np.ndarray
) -> np.ndarray:
    """Second (horizontal) pass of the block: exact Lanczos3 over the 8-bit first-pass rows, each row times its
    row_scale, one rounding to uint8.

    Integer weights (sum WEIGHT_SCALE) times uint8 pixels give integer sums below 2**24, exact in float32 in any
    order: BLAS blocking cannot change a bit, so any block of the output equals the same pixels of the whole.
    """
    x0, y0, x1, y1 = block
    bands = vertical.bands
    block_start, kernels, span = _horizontal_plan(vertical.width, out_w, x0, x1, bands)
    left, right = int(block_start[0]), int(block_start[-1]) + span  # input columns read; edges extend
    pad_left, pad_right = max(0, -left), max(0, right - vertical.width)
    if pad_left or pad_right:
        vertical = vertical.embed(pad_left, 0, vertical.width + pad_left + pad_right, vertical.height, extend="copy")
    offsets = (block_start - left) * bands
    step = H_BLOCK * bands
    out = np.empty((y1 - y0, x1 - x0, bands), np.uint8)
    # Buffers reused across row chunks: fresh multi-MB arrays cost a page fault per 4 KiB (10x the conversion).
    pixels = np.empty((min(ROW_CHUNK, y1 - y0), (right - left) * bands), np.float32)
    sums = np.empty((len(pixels), len(offsets) * step), np.float32)
    for top in range(y0, y1, ROW_CHUNK):
        rows = min(ROW_CHUNK, y1 - top)
        data = vertical.crop(left + pad_left, top, right - left, rows).write_to_memory()
        np.copyto(pixels[:rows], np.frombuffer(data, np.uint8).reshape(rows, -1))
        for index, offset in enumerate(offsets):
            np.matmul(
                pixels[:rows, offset : offset + span * bands],
                kernels[index],
                out=sums[:rows, index * step : (index + 1) * step],
            )
        result = sums[:rows, : (x1 - x0) * bands]
        np.multiply(result, row_scale[top : top + rows, None], out=result)
        np.clip(np.rint(result, out=result), 0, 255, out=result)  # clips ringing, as PIL's uint8 passes do
        out[top - y0 : top - y0 + rows] = result.reshape(rows, x1 - x0, bands)
    return out


def decoded(image: pyvips.Image) -> pyvips.Image:
    """`image`'s pixels computed once, into a buffer vips wraps (the image keeps it alive). Not copy_memory(): vips'
    reducev reads a copy_memory() image up to 2x slower (libvips 8.18; bench/results_shard.md)."""
    return pyvips.Image.new_from_memory(image.write_to_memory(), image.width, image.height, image.bands, image.format)


def _even_steps(length: int, most: int) -> list[tuple[int, int]]:
    """[start, stop) pieces of 0..length, as few as keep each <= most, of near-equal size (margins cost less)."""
    count = math.ceil(length / most)
    return [(length * i // count, length * (i + 1) // count) for i in range(count)]


def _output_span(start: int, stop: int, total: int, out_len: int) -> tuple[int, int]:
    """Output pixels [a, b) whose centres come from level-0 [start, stop) of `total`; consecutive spans tile."""
    return round(start * out_len / total), (out_len if stop >= total else round(stop * out_len / total))


def resample_together(
    source: pyvips.Image, sizes: Mapping[float, tuple[int, int]], window: int | None = None
) -> dict[float, np.ndarray]:
    """Lanczos3-resample one lazy uchar image (a level-0 box) to every size in {key: (w, h)}, decoding it once.

    The box is cut into near-equal pieces of at most `window` (default FETCH_WINDOW) px a side. Each piece,
    grown by the widest filter's support (3 x the largest shrink, + 4), is decoded into memory once and embedded
    at its place in an otherwise black box-size frame; for every size, lanczos_block then computes from that
    frame only the output block whose pixel centres lie in the piece. An output pixel reads only level-0 pixels
    within its filter support, all of which are real here, and its value does not depend on the block it is
    computed in, so the blocks are exactly the whole-box result and tile without seams; memory is bounded by
    the piece size.
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
            frame = decoded(source.crop(x0, y0, x1 - x0, y1 - y0)).embed(x0, y0, box_w, box_h)
            for key, (w, h) in sizes.items():
                ox0, ox1 = _output_span(x, x_end, box_w, w)
                oy0, oy1 = _output_span(y, y_end, box_h, h)
                if ox1 > ox0 and oy1 > oy0:
                    outs[key][oy0:oy1, ox0:ox1] = lanczos_block(frame, (w, h), (ox0, oy0, ox1, oy1))
    return outs
