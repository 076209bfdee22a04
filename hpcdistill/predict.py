"""Classify new slides with a trained (usually low-magnification) model: the point of the method.

For each slide: find its tissues on a thumbnail, read every tissue at the model's magnification (Lanczos from
level 0, as in training), and classify it whole. The slide-level call is the **area-weighted mean** of the tissue
probabilities, then argmax: a larger tissue carries more evidence, and averaging probabilities (rather than voting)
keeps an uncertain small fragment from flipping the call. Slides that cannot be read are reported, not fatal.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hpcdistill.errors import HpcdistillError
from hpcdistill.inference import NonFiniteOutputError, pick_device, predict_probabilities
from hpcdistill.run_folder import ExportedModel, load_exported
from hpcdistill.mags import mag_name
from hpcdistill.slides import open_slide, target_size
from hpcdistill.tissue import TissueParams, find_tissue_boxes, write_qc_png

# Distinct, colour-blind-friendly class colours for the overlay (Okabe-Ito).
CLASS_COLOURS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233)]


def predict_slide(exported: ExportedModel, slide_path: str | Path, out_dir: Path, *,
                  base_mag: float | None = None, tissue: TissueParams | None = None) -> dict:
    """Per-tissue probabilities, the slide call and an overlay PNG for one slide."""
    tissue = tissue or TissueParams()
    with open_slide(slide_path, base_mag=base_mag) as slide:
        info = slide.info
        if info.base_mag < exported.mag:
            raise HpcdistillError(
                f"{slide_path}: scanned at {mag_name(info.base_mag)}, below the model's {mag_name(exported.mag)}"
            )
        thumb, scale = slide.thumbnail(tissue.thumb_size)
        boxes = find_tissue_boxes(thumb, scale, tissue, slide_size=(info.width, info.height))
        if not boxes:
            raise HpcdistillError(f"{slide_path}: no tissue found on the thumbnail")
        tissues = []
        for index, box in enumerate(boxes):
            size = target_size(box[2:], info.base_mag, exported.mag)
            image = slide.read_at_mag(box, exported.mag, size)
            try:
                probs = predict_probabilities(exported, image, f"{slide_path} tissue {index}")
            except torch.cuda.OutOfMemoryError:  # one huge tissue skips its slide, not the whole batch of slides
                raise HpcdistillError(f"{slide_path}: tissue {index} ({size[0]}x{size[1]} px at "
                                      f"{mag_name(exported.mag)}) does not fit in GPU memory; rerun it with "
                                      "--device cpu") from None
            tissues.append({"tissue": index, "box_l0": list(box), "size": list(size),
                            "probs": probs.tolist(), "pred": exported.classes[int(probs.argmax())]})
    areas = np.array([t["box_l0"][2] * t["box_l0"][3] for t in tissues], dtype=np.float64)
    slide_probs = (np.array([t["probs"] for t in tissues]) * (areas / areas.sum())[:, None]).sum(0)
    call = exported.classes[int(slide_probs.argmax())]
    name = Path(slide_path).stem
    overlay = out_dir / "overlays" / f"{name}.png"
    overlay.parent.mkdir(parents=True, exist_ok=True)
    colours = [CLASS_COLOURS[exported.classes.index(t["pred"]) % len(CLASS_COLOURS)] for t in tissues]
    labels = [f"{t['tissue']}: {t['pred']} {max(t['probs']):.2f}" for t in tissues]
    write_qc_png(overlay, thumb, [tuple(t["box_l0"]) for t in tissues], scale, labels=labels, colors=colours)
    return {"slide": str(slide_path), "status": "ok", "call": call, "probs": slide_probs.tolist(),
            "base_mag": info.base_mag, "tissues": tissues, "overlay": str(overlay)}


def predict_slides(model_path: str | Path, slides: list[str | Path], out_dir: str | Path, *,
                   base_mag: float | None = None, tissue: TissueParams | None = None, device: str = "auto") -> dict:
    """Predict many slides; writes tissues.csv, slides.csv and predictions.json into out_dir."""
    exported = load_exported(model_path)
    exported.model.to(pick_device(device))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path in tqdm(slides, desc=f"predict @ {mag_name(exported.mag)}", unit="slide"):
        try:
            results.append(predict_slide(exported, path, out, base_mag=base_mag, tissue=tissue))
        except NonFiniteOutputError:
            raise  # the model is broken, not the slide: no class is written for any slide
        except HpcdistillError as err:
            print(f"hpcdistill: skipped: {err}")
            results.append({"slide": str(path), "status": "skipped", "reason": str(err)})
    with open(out / "tissues.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "tissue", "x", "y", "w", "h", "pred"] + [f"p_{c}" for c in exported.classes])
        for r in results:
            for t in r.get("tissues", []):
                writer.writerow([r["slide"], t["tissue"], *t["box_l0"], t["pred"], *(f"{p:.6f}" for p in t["probs"])])
    with open(out / "slides.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "status", "call", "reason"] + [f"p_{c}" for c in exported.classes])
        for r in results:
            probs = [f"{p:.6f}" for p in r.get("probs", [])] or [""] * len(exported.classes)
            writer.writerow([r["slide"], r["status"], r.get("call", ""), r.get("reason", ""), *probs])
    summary = {"model": str(model_path), "mag": exported.mag, "classes": exported.classes,
               "slide_rule": "area-weighted mean of tissue probabilities, then argmax", "slides": results}
    (out / "predictions.json").write_text(json.dumps(summary, indent=1))
    if not any(r["status"] == "ok" for r in results):
        raise HpcdistillError(f"{out}: no slide could be classified (see slides.csv)")
    return summary
