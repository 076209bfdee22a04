"""`predict --heatmap`: per slide, the class-activation maps of its tissues painted on the thumbnail (one
class's per-location probability, semi-transparent, inside the tissue mask only, with a colour bar, the class legend,
each tissue's call, and the slide and magnification in the title) and as raw arrays (`.npy`, float32, class x h x w
logits per tissue) with a JSON saying where each lies on the slide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hpcdistill.common.files import atomic_write_json
from hpcdistill.common.mags import mag_name
from hpcdistill.predict.cam import TissueMap
from hpcdistill.slides.tissue import font, text_size

HEAT_ALPHA = 0.55  # how opaque P(class) lies over the tissue


def paint(shape: tuple[int, int], scale: float, maps: list[TissueMap], class_index: int) -> np.ndarray:
    """A thumbnail-sized image of P(class) per location (NaN where no map lies); overlapping maps are averaged."""
    total, count = np.zeros(shape), np.zeros(shape)
    centres_x, centres_y = (np.arange(shape[1]) + 0.5) * scale, (np.arange(shape[0]) + 0.5) * scale
    for cam in maps:
        probs = cam.probabilities()[class_index]
        col = np.searchsorted(cam.x_edges, centres_x, side="right") - 1
        row = np.searchsorted(cam.y_edges, centres_y, side="right") - 1
        cols, rows = (
            np.flatnonzero((col >= 0) & (col < probs.shape[1])),
            np.flatnonzero((row >= 0) & (row < probs.shape[0])),
        )
        values = probs[row[rows]][:, col[cols]]
        known = ~np.isnan(values)
        rr, cc = np.ix_(rows, cols)
        total[rr, cc] += np.where(known, values, 0.0)
        count[rr, cc] += known
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def overlay_image(found: Any, maps: list[TissueMap], class_index: int, label: str) -> np.ndarray:
    """The thumbnail with P(class) painted over the tissue mask (magma, HEAT_ALPHA opaque) and a colour bar on its
    right, ready for the calls and legend the plain overlay draws (drawn with Pillow: a matplotlib figure cost
    more than a student's whole slide)."""
    height, width = found.thumb.shape[:2]
    heat = paint((height, width), found.scale, maps, class_index)
    heat[~found.mask()] = np.nan
    image = np.ascontiguousarray(found.thumb[..., :3])
    known = ~np.isnan(heat)
    colours = _heat_colours()[np.round(np.clip(heat[known], 0.0, 1.0) * 255).astype(np.intp)]
    image[known] = (image[known] * (1.0 - HEAT_ALPHA) + colours * HEAT_ALPHA + 0.5).astype(np.uint8)
    return np.concatenate([image, _colour_bar(height, label)], axis=1)


def _heat_colours() -> np.ndarray:
    """matplotlib's magma as 256 RGB rows (its colour map table only: no figure is made)."""
    from matplotlib import colormaps

    return (colormaps["magma"](np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def _colour_bar(height: int, label: str) -> np.ndarray:
    """A white strip `height` tall: the colour scale from 1 (top) to 0, its ticks, and `label` read upwards."""
    from PIL import Image, ImageDraw

    size = text_size(Image.new("RGB", (1, height)))
    face = font(size)
    bar_w, top, bottom = size, size, max(size + 2, height - size)
    strip = Image.new("RGB", (bar_w + 4 * size + 8, height), (255, 255, 255))
    ramp = np.linspace(1.0, 0.0, bottom - top)
    bar = _heat_colours()[np.round(ramp * 255).astype(np.intp)]
    strip.paste(Image.fromarray(np.repeat(bar[:, None], bar_w, axis=1)), (8, top))
    draw = ImageDraw.Draw(strip)
    for value in (1.0, 0.5, 0.0):
        y = round(top + (1.0 - value) * (bottom - top - 1))
        draw.line((8 + bar_w, y, 12 + bar_w, y), fill=(0, 0, 0))
        draw.text((14 + bar_w, y), f"{value:.1f}", fill=(0, 0, 0), font=face, anchor="lm")
    words = Image.new("RGB", (max(1, int(draw.textlength(label, font=face))) + 4, size + 6), (255, 255, 255))
    ImageDraw.Draw(words).text((2, 2), label, fill=(0, 0, 0), font=face)
    upright = words.rotate(90, expand=True)
    if upright.height <= height:
        strip.paste(upright, (strip.width - upright.width, (height - upright.height) // 2))
    return np.asarray(strip)


def write_arrays(
    folder: Path, stem: str, maps: list[TissueMap], classes: list[str], cell_l0: float, stride: int
) -> Path:
    """`<stem>.tissue<t>.npy` (float32 logits, class x h x w) per tissue, and `<stem>.heatmap.json` describing them."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for t, cam in enumerate(maps):
        array = folder / f"{stem}.tissue{t}.npy"
        np.save(array, cam.logits.astype(np.float32))
        entries.append(
            {
                "tissue": t,
                "array": array.name,
                "shape": list(cam.logits.shape),
                "box_l0": list(cam.box),
                "x_edges_l0": cam.x_edges.tolist(),
                "y_edges_l0": cam.y_edges.tolist(),
            }
        )
    meta = {
        "classes": classes,
        "values": "CAM logits per location (softmax over classes gives probabilities); "
        "their mean over a window's cells is the model's logit for it",
        "stride_px": stride,
        "cell_l0": cell_l0,
        "tissues": entries,
    }
    path = folder / f"{stem}.heatmap.json"
    atomic_write_json(path, meta, indent=1)
    return path


def heatmap_title(slide: str, mag: float, class_name: str) -> str:
    return f"{slide} - model at {mag_name(mag)} - CAM of {class_name}"
