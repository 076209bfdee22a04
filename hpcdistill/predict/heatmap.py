"""`predict --heatmap`: per slide, the class-activation maps of its tissues as an overlay on the thumbnail (one
class's per-location probability, semi-transparent, inside the tissue mask only, with a colour bar, the class legend,
each tissue's call, and the slide and magnification in the title) and as raw arrays (`.npy`, float32, class x h x w
logits per tissue) with a JSON saying where each lies on the slide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hpcdistill.common.files import atomic_output, atomic_write_json
from hpcdistill.common.mags import mag_name
from hpcdistill.predict.cam import TissueMap
from hpcdistill.slides.tissue import class_colour


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


def write_overlay(
    path: Path, found: Any, maps: list[TissueMap], tissues: list[dict], classes: list[str], class_index: int, title: str
) -> Path:
    """The overlay PNG: thumbnail, P(class) inside the tissue mask, colour bar, class legend, tissue calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    height, width = found.thumb.shape[:2]
    heat = paint((height, width), found.scale, maps, class_index)
    heat[~found.mask()] = np.nan
    fig, ax = plt.subplots(figsize=(max(6.0, width / 110), max(4.0, height / 110) + 0.8), dpi=110)
    ax.imshow(found.thumb)
    shown = ax.imshow(np.ma.masked_invalid(heat), cmap="magma", vmin=0, vmax=1, alpha=0.55, interpolation="nearest")
    colours = [tuple(c / 255 for c in class_colour(i)) for i in range(len(classes))]
    for t in tissues:
        x, y, w, h = (v / found.scale for v in t["box_l0"])
        colour = colours[classes.index(t["pred"])]
        ax.add_patch(patches.Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=2))
        ax.text(
            x + 3,
            y + 3,
            f"t{t['tissue']}: {t['pred']} {max(t['probs']):.2f}",
            color="black",
            fontsize=11,
            va="top",
            bbox={"facecolor": "white", "edgecolor": colour, "alpha": 0.85, "pad": 2},
        )
    fig.colorbar(shown, ax=ax, fraction=0.035, pad=0.02, label=f"P({classes[class_index]}) per CAM cell")
    ax.legend(
        handles=[patches.Patch(color=c, label=name) for c, name in zip(colours, classes)],
        title="tissue call",
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=min(len(classes), 5),
        fontsize=10,
    )
    ax.set_title(title, fontsize=12)
    ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


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
