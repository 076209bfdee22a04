"""Classify new slides with a trained (usually low-magnification) model: the point of the method.

For each slide: find its tissues on a thumbnail and cut them into the windows the model's training shards were cut
into (windows.py, with the windowing stored in the export), read every window at the model's magnification (Lanczos
from level 0, as in training) and classify it whole. A tissue's probabilities are the area-weighted mean of its
windows', and the slide call is the **area-weighted mean** over all windows, then argmax: a larger tissue carries
more evidence, and averaging probabilities (rather than voting) keeps an uncertain small fragment from flipping the
call. Slides that cannot be read are reported, not fatal.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from hpcdistill.errors import HpcdistillError
from hpcdistill.inference import NonFiniteOutputError, model_outputs, pick_device, require_finite, standardise
from hpcdistill.mags import mag_name
from hpcdistill.run_folder import ExportedModel, load_exported
from hpcdistill.slides import open_slide
from hpcdistill.tissue import TissueParams, write_qc_png
from hpcdistill.windows import TissueWindows, find_windows, window_sizes

# Distinct, colour-blind-friendly class colours for the overlay (Okabe-Ito).
CLASS_COLOURS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233)]


def _window_batches(slide: Any, found: TissueWindows, exported: ExportedModel,
                    slide_path: str | Path) -> Iterator[dict[str, Any]]:
    """One batch per window, standardised as in training; the key names the slide, tissue and window."""
    for t, windows in enumerate(found.windows):
        for w, window in enumerate(windows):
            size = window_sizes(window, slide.info.base_mag, [exported.mag])[exported.mag]
            image = slide.read_at_mag(window, exported.mag, size)
            yield {"key": [f"{slide_path} tissue {t} window {w}"], "x": standardise(image, exported.stats),
                   "tissue": t, "window": w, "box_l0": list(window), "size": list(size)}


def _area_mean(probs: list[list[float]], boxes: list[list[int]]) -> np.ndarray:
    areas = np.array([b[2] * b[3] for b in boxes], dtype=np.float64)
    return (np.array(probs) * (areas / areas.sum())[:, None]).sum(0)


def _classify_windows(slide: Any, found: TissueWindows, exported: ExportedModel,
                      slide_path: str | Path) -> list[dict[str, Any]]:
    """Every window's probabilities, through the shared model-over-stream loop."""
    rows = []
    batches = _window_batches(slide, found, exported, slide_path)
    for batch, _, logits in model_outputs(exported.model, batches, exported.device, mag=exported.mag,
                                          remedy="rerun it with --device cpu"):
        require_finite(logits, exported.path, batch["key"][0])
        probs = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
        rows.append({"tissue": batch["tissue"], "window": batch["window"], "box_l0": batch["box_l0"],
                     "size": batch["size"], "probs": probs.tolist(), "pred": exported.classes[int(probs.argmax())]})
    return rows


def predict_slide(exported: ExportedModel, slide_path: str | Path, out_dir: Path, *,
                  base_mag: float | None = None, tissue: TissueParams | None = None) -> dict:
    """Per-window and per-tissue probabilities, the slide call and an overlay PNG for one slide."""
    tissue = tissue or TissueParams()
    with open_slide(slide_path, base_mag=base_mag) as slide:
        info = slide.info
        if info.base_mag < exported.mag:
            raise HpcdistillError(
                f"{slide_path}: scanned at {mag_name(info.base_mag)}, below the model's {mag_name(exported.mag)}"
            )
        found = find_windows(slide, tissue, exported.windowing)
        if not found.boxes:
            raise HpcdistillError(f"{slide_path}: no tissue found on the thumbnail")
        windows = _classify_windows(slide, found, exported, slide_path)
    tissues = []
    for t, box in enumerate(found.boxes):
        mine = [w for w in windows if w["tissue"] == t]
        probs = _area_mean([w["probs"] for w in mine], [w["box_l0"] for w in mine])
        tissues.append({"tissue": t, "box_l0": list(box), "windows": len(mine), "probs": probs.tolist(),
                        "pred": exported.classes[int(probs.argmax())]})
    slide_probs = _area_mean([w["probs"] for w in windows], [w["box_l0"] for w in windows])
    overlay = Path(out_dir).resolve() / "overlays" / f"{Path(slide_path).stem}.png"  # readable from anywhere
    overlay.parent.mkdir(parents=True, exist_ok=True)
    colours = [CLASS_COLOURS[exported.classes.index(t["pred"]) % len(CLASS_COLOURS)] for t in tissues]
    labels = [f"{t['tissue']}: {t['pred']} {max(t['probs']):.2f}" for t in tissues]
    write_qc_png(overlay, found.thumb, [tuple(t["box_l0"]) for t in tissues], found.scale, labels=labels, colors=colours)
    return {"slide": str(slide_path), "status": "ok", "call": exported.classes[int(slide_probs.argmax())],
            "probs": slide_probs.tolist(), "base_mag": info.base_mag, "tissues": tissues, "windows": windows,
            "overlay": str(overlay)}


def classify_slides(exported: ExportedModel, slides: list[str | Path], out: Path, *, base_mag: float | None = None,
                    tissue: TissueParams | None = None, progress: bool | None = None) -> list[dict]:
    """Each slide's result (or why it was skipped), in the given order; overlays go to `out`/overlays."""
    results = []
    for path in tqdm(slides, desc=f"predict @ {mag_name(exported.mag)}", unit="slide",
                     disable=None if progress is None else not progress):
        try:
            results.append(predict_slide(exported, path, out, base_mag=base_mag, tissue=tissue))
        except NonFiniteOutputError:
            raise  # the model is broken, not the slide: no class is written for any slide
        except HpcdistillError as err:
            print(f"hpcdistill: skipped: {err}")
            results.append({"slide": str(path), "status": "skipped", "reason": str(err)})
    return results


def summarise(model_path: str | Path, exported: ExportedModel) -> dict[str, Any]:
    """What predictions.json says about the model, before its per-slide results."""
    return {"model": str(model_path), "mag": exported.mag, "classes": exported.classes,
            "windowing": exported.windowing.to_dict(),
            "slide_rule": "area-weighted mean of window probabilities, then argmax"}


def write_predictions(out: Path, summary: dict[str, Any], results: list[dict]) -> dict[str, Any]:
    """tissues.csv, slides.csv and predictions.json for `results` (one per slide, in slide order)."""
    classes = summary["classes"]
    with open(out / "tissues.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "tissue", "x", "y", "w", "h", "pred"] + [f"p_{c}" for c in classes])
        for r in results:
            for t in r.get("tissues", []):
                writer.writerow([r["slide"], t["tissue"], *t["box_l0"], t["pred"], *(f"{p:.6f}" for p in t["probs"])])
    with open(out / "slides.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "status", "call", "reason"] + [f"p_{c}" for c in classes])
        for r in results:
            probs = [f"{p:.6f}" for p in r.get("probs", [])] or [""] * len(classes)
            writer.writerow([r["slide"], r["status"], r.get("call", ""), r.get("reason", ""), *probs])
    summary = {**summary, "slides": results}
    (out / "predictions.json").write_text(json.dumps(summary, indent=1))
    if not any(r["status"] == "ok" for r in results):
        raise HpcdistillError(f"{out}: no slide could be classified (see slides.csv)")
    return summary


def predict_slides(model_path: str | Path, slides: list[str | Path], out_dir: str | Path, *,
                   base_mag: float | None = None, tissue: TissueParams | None = None, device: str = "auto") -> dict:
    """Predict many slides in this process; writes tissues.csv, slides.csv and predictions.json into out_dir."""
    exported = load_exported(model_path)
    exported.model.to(pick_device(device))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = classify_slides(exported, slides, out, base_mag=base_mag, tissue=tissue)
    return write_predictions(out, summarise(model_path, exported), results)
