"""Tissue localization on a slide thumbnail (in the spirit of tissueloc, which the paper used).

Otsu threshold on HSV saturation (stained tissue is coloured, glass is white/grey) or on grey level (tissue is
darker), with green and strongly blue pen ink left out first (`ink_mask`), morphological close then open, small
objects removed, one padded bounding box per connected component, returned in level-0 coordinates.

A per-slide fixed cost, so kept cheap (one core, 2048 px thumbnail: ~70 ms for the mask, ~60 ms for the QC PNG;
4x less at the default 1024 px):
8/16-bit channel arithmetic, libvips `morph` for the disk close/open (~10x scipy's binary morphology, same
result), libvips PNG at a low compression level.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyvips
from PIL import Image, ImageDraw, ImageFont

from hpcdistill.common.errors import SlideError
from hpcdistill.common.files import atomic_output

# Box colours for the QC image when none are given (distinct on white and on H&E pink/purple).
QC_PALETTE = ((0, 160, 0), (0, 90, 255), (255, 140, 0), (220, 0, 0), (0, 180, 180), (140, 0, 200))
# Class colours of prediction overlays, heat maps and QuPath classifications: distinct, colour-blind-friendly
# (Okabe-Ito)
CLASS_COLOURS = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233))


def class_colour(index: int) -> tuple[int, int, int]:
    """The colour of class `index` (the palette repeats past six classes)."""
    return CLASS_COLOURS[index % len(CLASS_COLOURS)]


# zlib level of the QC PNG: 3 is ~3x faster than the default 6 for ~20% more bytes on a noisy thumbnail.
QC_PNG_COMPRESSION = 3


@dataclass(frozen=True)
class TissueParams:
    # Each field's "help" is also its `--tissue-<name>` flag's help in the CLI.
    thumb_size: int = field(
        default=1024, metadata={"help": "long side of the thumbnail the mask is computed on (px); the QC PNG's size"}
    )
    channel: str = field(default="saturation", metadata={"help": "saturation: coloured = tissue; grey: dark = tissue"})
    close_radius: int = field(default=4, metadata={"help": "thumbnail px; bridges gaps inside a tissue piece"})
    open_radius: int = field(default=2, metadata={"help": "thumbnail px; removes dust and thin debris"})
    min_area_frac: float = field(
        default=0.0005, metadata={"help": "components smaller than this fraction of the thumbnail are dropped"}
    )
    pad_frac: float = field(
        default=0.02, metadata={"help": "each box grows by this fraction of its long side on every side"}
    )
    min_contrast: float = field(
        default=8.0, metadata={"help": "channel range (0-255) below which the thumbnail is blank: no tissue"}
    )
    drop_ink: bool = field(
        default=True,
        metadata={"help": "leave green/cyan and saturated blue pen marks out of the mask and of the Otsu threshold"},
    )

    def __post_init__(self) -> None:
        if self.channel not in ("saturation", "grey"):
            raise SlideError(f"tissue channel {self.channel!r}: expected 'saturation' or 'grey'")
        if self.thumb_size < 1:
            raise SlideError(f"tissue thumb_size: must be >= 1, got {self.thumb_size}")
        for name in ("close_radius", "open_radius", "min_area_frac", "pad_frac", "min_contrast"):
            if getattr(self, name) < 0:
                raise SlideError(f"tissue {name}: must be >= 0, got {getattr(self, name)}")


def disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element of the given radius (radius 0: a single pixel)."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx * xx + yy * yy <= radius * radius


def _morph(mask: pyvips.Image, radius: int, op: str) -> pyvips.Image:
    """Binary dilate/erode of a 0/255 uchar image by disk(radius); vips mask: 255 = in the disk, 128 = ignore."""
    element = np.where(disk(radius), 255, 128).astype(np.uint8)
    return mask.morph(pyvips.Image.new_from_array(element.tolist()), op)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: the t maximising between-class variance of (<= t) vs (> t)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * levels)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(np.argmax(between))


def tissue_channel(thumb: np.ndarray, channel: str) -> np.ndarray:
    """uint8 map where larger = more tissue-like: HSV saturation, or inverted grey level."""
    red, green, blue = thumb[..., 0], thumb[..., 1], thumb[..., 2]  # per-plane: no (H, W, 3) int32 copy
    if channel == "saturation":
        high = np.maximum(np.maximum(red, green), blue)
        low = np.minimum(np.minimum(red, green), blue)
        return ((high - low).astype(np.uint16) * 255 // np.maximum(high, 1)).astype(np.uint8)
    grey = red * np.uint32(299)
    grey += green * np.uint32(587)
    grey += blue * np.uint32(114)
    grey += 500
    return (255 - grey // 1000).astype(np.uint8)


def ink_mask(thumb: np.ndarray) -> np.ndarray:
    """Pen marks on the glass or over tissue, which a saturation threshold takes for tissue. H&E is pink to purple
    (hue ~270-360 and 0-20 degrees), but dense hematoxylin reaches down to ~230 degrees, where blue markers sit
    (~225-230), at saturation up to 0.70 on the 119 demo slides' thumbnails (stain and scanner vary). So ink is
    green/cyan (hue 70-190) at any clear saturation, or blue (190-235) only above saturation 0.75: pale blue ink is
    missed (an extra box in the QC PNG) rather than nuclei cut out of the tissue."""
    # In exact integer arithmetic: with d = max - min, hue = 60 * ((g - b) / d mod 6) where red is the max, else
    # 60 * ((b - r) / d + 2) where green is, else 60 * ((r - g) / d + 4); each hue bound is a linear inequality.
    red, green, blue = (thumb[..., c].astype(np.int16) for c in range(3))
    high = np.maximum(np.maximum(red, green), blue)
    delta = high - np.minimum(np.minimum(red, green), blue)
    clear = (delta >= 24) & (20 * delta > 3 * high)  # saturation > 0.15: glass noise and grey debris have no hue
    red_max = high == red
    green_max = ~red_max & (high == green)
    blue_max = ~red_max & ~green_max
    rg = 6 * (red - green)
    green_cyan = (green_max & (6 * (blue - red) >= -5 * delta)) | (blue_max & (rg < -5 * delta))  # hue 70-190
    strong_blue = blue_max & (rg >= -5 * delta) & (2 * rg <= -delta) & (4 * delta > 3 * high)  # 190-235, sat > 0.75
    return clear & (green_cyan | strong_blue)


def tissue_threshold(thumb: np.ndarray, params: TissueParams) -> float | None:
    """The Otsu threshold of the thumbnail's tissue channel (ink left out, which would pull it); None for a flat,
    blank slide, where Otsu would split noise."""
    return _threshold(tissue_channel(thumb, params.channel), ink_mask(thumb) if params.drop_ink else None, params)


def _threshold(values: np.ndarray, ink: np.ndarray | None, params: TissueParams) -> float | None:
    candidates = values if ink is None else values[~ink]
    if candidates.size == 0 or int(candidates.max()) - int(candidates.min()) < params.min_contrast:
        return None
    return otsu_threshold(candidates)


def fine_tissue_mask(fine: np.ndarray, threshold: float | None, params: TissueParams) -> np.ndarray:
    """A finer thumbnail's (or a crop of one's) tissue pixels at `threshold`, the coarse thumbnail's
    (`tissue_threshold`: what the tissue finder used), for outlines traced finer than tissue is found
    (slides.outlines)."""
    if threshold is None:
        return np.zeros(fine.shape[:2], bool)
    mask = tissue_channel(fine, params.channel) > threshold
    if params.drop_ink:  # ink looked for only where the threshold found tissue: the same mask, a fraction of the work
        candidates = np.flatnonzero(mask)
        mask.ravel()[candidates[ink_mask(fine.reshape(-1, 3)[candidates])]] = False
    return mask


def _ndimage() -> Any:
    """scipy.ndimage, imported on first use: the CLI's parsers and `--help` import this module and need none of it
    (0.15 s of start-up)."""
    from scipy import ndimage

    return ndimage


def tissue_mask(thumb: np.ndarray, params: TissueParams) -> np.ndarray:
    """Boolean tissue mask of the thumbnail, after close/open and small-object removal."""
    return tissue_mask_at(thumb, params)[0]


def tissue_mask_at(thumb: np.ndarray, params: TissueParams) -> tuple[np.ndarray, float | None]:
    """The tissue mask and the threshold it was cut at (`tissue_threshold`'s; None: a blank slide, no tissue)."""
    values = tissue_channel(thumb, params.channel)
    ink = ink_mask(thumb) if params.drop_ink else None
    threshold = _threshold(values, ink, params)
    if threshold is None:
        return np.zeros(values.shape, dtype=bool), None
    mask = values > threshold
    if ink is not None:
        mask &= ~ink
    # Pad before morphology so tissue touching the border is not eroded by the border.
    pad = max(params.close_radius, params.open_radius)
    image = pyvips.Image.new_from_array(np.pad(mask, pad, mode="edge").view(np.uint8) * np.uint8(255))
    if params.close_radius:
        image = _morph(_morph(image, params.close_radius, "dilate"), params.close_radius, "erode")
    if params.open_radius:
        image = _morph(_morph(image, params.open_radius, "erode"), params.open_radius, "dilate")
    mask = image.numpy()[pad : pad + values.shape[0], pad : pad + values.shape[1]] > 0
    labels, count = _ndimage().label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask, threshold
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas >= max(1.0, params.min_area_frac * mask.size)
    keep[0] = False
    return keep[labels], threshold


def find_tissue_boxes(
    thumb: np.ndarray, scale: float, params: TissueParams, slide_size: tuple[int, int] | None = None
) -> list[tuple[int, int, int, int]]:
    """Level-0 boxes (x, y, w, h) of the tissue pieces, padded, clipped to the slide, sorted top-to-bottom then
    left-to-right. `scale` is level-0 px per thumbnail px; `slide_size` (w, h) defaults to thumbnail * scale."""
    return find_tissues(thumb, scale, params, slide_size).boxes


class Tissues(NamedTuple):
    """What find_tissues found on a thumbnail."""

    boxes: list[tuple[int, int, int, int]]  # level 0, padded, top-to-bottom then left-to-right
    labels: np.ndarray  # the thumbnail's labelled tissue mask (0 = background)
    owners: list[int]  # box t's label in it
    threshold: float | None  # the tissue channel's threshold (None: a blank slide), for finer masks (outlines.py)


def find_tissues(
    thumb: np.ndarray,
    scale: float,
    params: TissueParams,
    slide_size: tuple[int, int] | None = None,
    keep: np.ndarray | None = None,
) -> Tissues:
    """The boxes as find_tissue_boxes gives them, the thumbnail's labelled tissue mask (0 = background), each box's
    label in it (the tissue's own outline, for polygons and heat maps) and the threshold. `keep`: the thumbnail
    pixels tissue may lie in (the user's regions), applied before tissues are told apart."""
    if thumb.ndim != 3 or thumb.shape[2] < 3 or thumb.dtype != np.uint8:
        raise SlideError(f"tissue thumbnail: expected (H, W, 3) uint8, got {thumb.shape} {thumb.dtype}")
    if not scale > 0:
        raise SlideError(f"tissue scale: must be positive, got {scale}")
    thumb_h, thumb_w = thumb.shape[:2]
    slide_w, slide_h = slide_size if slide_size is not None else (round(thumb_w * scale), round(thumb_h * scale))
    mask, threshold = tissue_mask_at(thumb, params)
    mask = mask if keep is None else mask & keep
    labels, _ = _ndimage().label(mask, structure=np.ones((3, 3), dtype=bool))
    boxes, owners = [], []
    for label, found in enumerate(_ndimage().find_objects(labels), 1):
        if found is None:
            continue
        rows, cols = found
        pad = params.pad_frac * max(rows.stop - rows.start, cols.stop - cols.start)
        x0 = max(0, int(np.floor((cols.start - pad) * scale)))
        y0 = max(0, int(np.floor((rows.start - pad) * scale)))
        x1 = min(slide_w, int(np.ceil((cols.stop + pad) * scale)))
        y1 = min(slide_h, int(np.ceil((rows.stop + pad) * scale)))
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1 - x0, y1 - y0))
            owners.append(label)
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][1], boxes[i][0], boxes[i][3], boxes[i][2]))
    return Tissues([boxes[i] for i in order], labels, [owners[i] for i in order], threshold)


def font(size: int) -> ImageFont.FreeTypeFont:
    """A scalable font (Pillow's own), so labels stay readable at 100% zoom whatever the thumbnail size."""
    return ImageFont.load_default(size=size)


def text_size(image: Image.Image) -> int:
    return max(14, round(max(image.size) / 90))


def draw_legend(image: Image.Image, title: str, entries: list[tuple[str, tuple[int, int, int] | str]]) -> Image.Image:
    """The image with a white band below it: a title line, then one coloured swatch and name per entry."""
    size = text_size(image)
    face = font(size)
    per_row = max(1, image.width // (size * 12))
    rows = 1 + (len(entries) + per_row - 1) // per_row
    out = Image.new("RGB", (image.width, image.height + rows * (size + 8) + 8), (255, 255, 255))
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    top = image.height + 6
    draw.text((8, top), title, fill=(0, 0, 0), font=face)
    for i, (name, colour) in enumerate(entries):
        x, y = 8 + (i % per_row) * size * 12, top + (1 + i // per_row) * (size + 8)
        draw.rectangle((x, y + 2, x + size, y + size + 2), fill=colour)
        draw.text((x + size + 6, y), name, fill=(0, 0, 0), font=face)
    return out


def write_qc_png(
    path: str | os.PathLike,
    thumb: np.ndarray,
    boxes_l0: list[tuple[int, int, int, int]],
    scale: float,
    labels: list[str] | None = None,
    colors: list[tuple[int, int, int] | str] | None = None,
    title: str | None = None,
    legend: list[tuple[str, tuple[int, int, int] | str]] | None = None,
) -> None:
    """Draw the level-0 boxes (and their labels, in text readable at 100% zoom) on the thumbnail, with a title and
    legend band below it, and write it as PNG (atomically, fast zlib)."""
    if labels is not None and len(labels) != len(boxes_l0):
        raise SlideError(f"{path}: {len(labels)} labels for {len(boxes_l0)} boxes")
    if colors is not None and len(colors) != len(boxes_l0):
        raise SlideError(f"{path}: {len(colors)} colours for {len(boxes_l0)} boxes")
    image = Image.fromarray(np.ascontiguousarray(thumb[..., :3]), mode="RGB")
    draw = ImageDraw.Draw(image)
    line = max(2, round(max(image.size) / 400))
    face = font(text_size(image))
    for index, (x, y, w, h) in enumerate(boxes_l0):
        colour = colors[index] if colors is not None else QC_PALETTE[index % len(QC_PALETTE)]
        corners = (x / scale, y / scale, (x + w) / scale - 1, (y + h) / scale - 1)
        draw.rectangle(corners, outline=colour, width=line)
        if labels is not None:
            text_at = (corners[0] + line + 2, corners[1] + line + 2)
            draw.text(text_at, labels[index], fill=colour, font=face, stroke_width=2, stroke_fill=(255, 255, 255))
    if title is not None or legend:
        image = draw_legend(image, title or "", legend or [])
    _save_png(path, np.asarray(image))


def _save_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_output(path) as tmp:  # a full disk: no half-written PNG stays behind
        pyvips.Image.new_from_array(pixels).pngsave(str(tmp), compression=QC_PNG_COMPRESSION, filter="sub")
