"""Classify new slides with a trained (usually low-magnification) model: the point of the method.

For each slide: find its tissues on a thumbnail and cut them into the windows the model's training shards were cut
into (windows.py, with the windowing stored in the export), read every window at the model's magnification (Lanczos
from level 0, or from the smallest pyramid level at or above it: what the training shards were cut from, or `read`)
and classify it whole. A tissue's probabilities are the area-weighted mean of its windows', and the slide call is made
by the rule `scoring.aggregation` shares with `evaluate --unit slide` (by default the area-weighted mean over all
windows, then argmax: a larger tissue carries more evidence, and averaging probabilities rather than voting keeps an
uncertain small fragment from flipping the call). Slides that cannot be read are reported, not fatal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from hpcdistill.common.errors import HpcdistillError, NonFiniteOutputError, PredictionError, one_line
from hpcdistill.common.folder_lock import one_writer
from hpcdistill.common.mags import mag_name
from hpcdistill.common.provenance import provenance
from hpcdistill.common.signals import check_interrupted
from hpcdistill.models.export import ExportedModel, load_exported
from hpcdistill.models.inference import model_outputs, pick_device, require_finite, standardise
from hpcdistill.predict.cam import STEM_STRIDE, TissueMap, WindowMap, cam_logits, tissue_map
from hpcdistill.predict.heatmap import heatmap_title, overlay_image, write_arrays
from hpcdistill.predict.options import PredictOptions, announce, check_options, slide_scale
from hpcdistill.predict.qupath import write_geojson
from hpcdistill.predict.result_files import write_predictions
from hpcdistill.scoring.aggregation import SLIDE_RULES, area_mean, combine
from hpcdistill.scoring.metrics import kappa_weights_of
from hpcdistill.slides.catalog import check_slide_ids, slide_name
from hpcdistill.slides.factory import open_slide
from hpcdistill.slides.outlines import tissue_outlines
from hpcdistill.slides.tissue import class_colour, write_qc_png
from hpcdistill.slides.windows import TissueWindows, find_windows, fitting_windows, window_sizes


def _window_batches(
    slide: Any, found: TissueWindows, exported: ExportedModel, slide_path: str | Path, read: str, stain: tuple | None
) -> Iterator[dict[str, Any]]:
    """One batch per window, stain-normalised with the slide's fit (`stain`, when the model's shards were) and
    standardised as in training; the key names the slide, tissue and window."""
    for t, windows in enumerate(found.windows):
        for w, window in enumerate(windows):
            size = window_sizes(window, slide.info.base_mag, [exported.mag])[exported.mag]
            image = slide.read_at_mag(window, exported.mag, size, read)
            image = exported.stain_norm.apply(image, stain) if stain else image
            yield {
                "key": [f"{slide_path} tissue {t} window {w}"],
                "x": standardise(image, exported.stats),
                "tissue": t,
                "window": w,
                "box_l0": list(window),
                "size": list(size),
            }


def _classify_windows(
    slide: Any,
    found: TissueWindows,
    exported: ExportedModel,
    slide_path: str | Path,
    with_cam: bool,
    read: str,
    stain: tuple | None,
) -> tuple[list[dict[str, Any]], list[WindowMap]]:
    """Every window's probabilities (and CAM, `with_cam`), through the shared model-over-stream loop."""
    rows, cams = [], []
    stride = STEM_STRIDE[exported.arch_kwargs.get("stem", "standard")]
    batches = _window_batches(slide, found, exported, slide_path, read, stain)
    for batch, features, logits in model_outputs(
        exported.model, batches, exported.device, mag=exported.mag, remedy="rerun it with --device cpu"
    ):
        require_finite(logits, exported.path, batch["key"][0])
        probs = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
        rows.append(
            {
                "tissue": batch["tissue"],
                "window": batch["window"],
                "box_l0": batch["box_l0"],
                "size": batch["size"],
                "probs": probs.tolist(),
                "pred": exported.classes[int(probs.argmax())],
            }
        )
        if with_cam:
            logits_map = cam_logits(exported.model, features)[0].cpu().numpy()
            cams.append(WindowMap.of(logits_map, tuple(batch["box_l0"]), tuple(batch["size"]), stride))
    return rows, cams


def slide_call(windows: list[dict], rule: str, classes: list[str]) -> tuple[str, np.ndarray]:
    """The slide's class and the scores it was chosen from, by `rule` (scoring.aggregation, shared with
    `evaluate --unit slide`)."""
    probs = np.array([w["probs"] for w in windows], dtype=np.float64)
    areas = np.array([w["box_l0"][2] * w["box_l0"][3] for w in windows], dtype=np.float64)
    scores = combine(probs, areas, [w["tissue"] for w in windows], rule)
    return classes[int(scores.argmax())], scores


def _tissue_calls(found: TissueWindows, windows: list[dict], classes: list[str]) -> list[dict]:
    tissues = []
    for t, box in enumerate(found.boxes):
        mine = [w for w in windows if w["tissue"] == t]
        probs = area_mean([w["probs"] for w in mine], [w["box_l0"][2] * w["box_l0"][3] for w in mine])
        tissues.append(
            {
                "tissue": t,
                "box_l0": list(box),
                "windows": len(mine),
                "probs": probs.tolist(),
                "pred": classes[int(probs.argmax())],
            }
        )
    return tissues


def _write_overlay(
    path: Path,
    found: TissueWindows,
    tissues: list[dict],
    classes: list[str],
    title: str,
    image: np.ndarray | None = None,
) -> None:
    """The tissues' boxes and calls, the title and the class legend on the thumbnail (or on `image`, the thumbnail
    painted with a heat map)."""
    colours = [class_colour(classes.index(t["pred"])) for t in tissues]
    labels = [f"t{t['tissue']}: {t['pred']} {max(t['probs']):.2f}" for t in tissues]
    legend = [(c, class_colour(i)) for i, c in enumerate(classes)]
    write_qc_png(
        path,
        found.thumb if image is None else image,
        [tuple(t["box_l0"]) for t in tissues],
        found.scale,
        labels=labels,
        colors=colours,
        title=title,
        legend=legend,
    )


def _write_heatmaps(
    out: Path,
    stem: str,
    found: TissueWindows,
    cams: list[WindowMap],
    windows: list[dict],
    tissues: list[dict],
    exported: ExportedModel,
    class_name: str,
) -> tuple[list[TissueMap], dict]:
    maps = [tissue_map([c for c, w in zip(cams, windows) if w["tissue"] == t]) for t in range(len(found.boxes))]
    stride = STEM_STRIDE[exported.arch_kwargs.get("stem", "standard")]
    cell_l0 = float(np.median([np.diff(m.x_edges).max() for m in maps]))  # level-0 px per cell
    png = out / "heatmaps" / f"{stem}.png"
    image = overlay_image(found, maps, exported.classes.index(class_name), f"P({class_name}) per CAM cell")
    _write_overlay(png, found, tissues, exported.classes, heatmap_title(stem, exported.mag, class_name), image)
    arrays = write_arrays(out / "heatmaps", stem, maps, exported.classes, cell_l0, stride)
    return maps, {"heatmap": str(png), "heatmap_arrays": str(arrays)}


def predict_slide(
    exported: ExportedModel, slide_path: str | Path, out_dir: Path, options: PredictOptions = PredictOptions()
) -> dict:
    """Per-window and per-tissue probabilities, the slide call, an overlay PNG and a QuPath GeoJSON for one slide
    (and its heat maps with `options.heatmap`)."""
    with open_slide(slide_path, base_mag=options.base_mag, scale=slide_scale(options, exported)) as slide:
        info = slide.info
        if info.base_mag < exported.mag:
            raise PredictionError(
                f"{slide_path}: scanned at {mag_name(info.base_mag)}, below the model's {mag_name(exported.mag)}"
            )
        found, small = prediction_windows(slide, slide_path, exported, options)
        if not found.boxes:
            raise PredictionError(f"{slide_path}: no tissue found on the thumbnail" + (f" ({small})" if small else ""))
        read = options.read or exported.source
        stain = _stain_fit(exported, found, slide_path)
        windows, cams = _classify_windows(slide, found, exported, slide_path, options.heatmap, read, stain)
        source = read_record(slide, exported.mag, read)
        outlines = tissue_outlines(slide, found, options.tissue)
    classes, out, stem = exported.classes, Path(out_dir).resolve(), Path(slide_path).stem  # paths readable anywhere
    tissues = _tissue_calls(found, windows, classes)
    call, scores = slide_call(windows, options.slide_rule, classes)
    result = {
        "slide": slide_name(Path(slide_path)),
        "path": str(slide_path),
        "status": "ok",
        "call": call,
        "rule": options.slide_rule,
        "probs": scores.tolist(),
        **_scale_record(info, stain),
        **source,
        "tissues": tissues,
        "windows": windows,
        "overlay": str(out / "overlays" / f"{stem}.png"),
    }
    result["note"] = "; ".join(n for n in (result.get("note", ""), small) if n)
    title = f"{stem}: {call} ({options.slide_rule} rule), model at {mag_name(exported.mag)}"
    _write_overlay(Path(result["overlay"]), found, tissues, classes, title)
    maps = None
    if options.heatmap:
        maps, paths = _write_heatmaps(out, stem, found, cams, windows, tissues, exported, options.heatmap_class or call)
        result.update(paths)
    geojson = write_geojson(out / "geojson" / f"{stem}.geojson", outlines, tissues, classes, maps)
    result["geojson"] = str(geojson)
    return result


def _stain_fit(exported: ExportedModel, found: TissueWindows, slide_path: str | Path) -> tuple[float, ...] | None:
    """The slide's own stain, fitted on its tissue, when the model's shards were normalised (slides.stain)."""
    if not exported.stain_norm.active:
        return None
    return exported.stain_norm.fit_slide(found.thumb, found.mask(), str(slide_path))


def _scale_record(info: Any, stain: tuple[float, ...] | None) -> dict[str, Any]:
    """How the slide was read: its magnification and where it came from, its pixel size, its stain fit."""
    fit = None if stain is None else [round(v, 6) for v in stain]
    return {"base_mag": info.base_mag, "mag_source": info.mag_source, "mpp": info.mpp, "stain": fit}


def prediction_windows(
    slide: Any, slide_path: str | Path, exported: ExportedModel, options: PredictOptions
) -> tuple[TissueWindows, str]:
    """The tissue windows prediction reads (the user's regions applied, tissues too small for the model out)."""
    regions = options.rois.regions_for(slide_path, slide_name(Path(slide_path)))
    found = find_windows(slide, options.tissue, exported.windowing, regions, options.rois.mode)
    return drop_small_tissues(found, exported, slide.info)


def drop_small_tissues(found: TissueWindows, exported: ExportedModel, info: Any) -> tuple[TissueWindows, str]:
    """The tissues and windows the model can take (windows.fitting_windows at the model's magnification and
    smallest input, exported.min_side); returns them and a note on what went."""
    kept = fitting_windows(found, info.base_mag, [exported.mag], exported.min_side)
    if kept.small == found.small:
        return kept, ""
    side = f"{exported.min_side} px at {mag_name(exported.mag)}"
    return kept, f"{kept.small - found.small} tissue(s) under {side} skipped: too small for the model"


def read_record(slide: Any, mag: float, read: str) -> dict[str, Any]:
    """Where the slide's windows were read from: the source, the level and its magnification, and a note when the
    pyramid has no level near the model's magnification (the next level up was read, at more decode cost)."""
    level = slide.level_for(mag) if read == "pyramid" else slide.levels()[0]
    level_mag = level.magnification(slide.info.base_mag)
    record = {"read": read, "level": level.index, "level_mag": round(level_mag, 4), "note": ""}
    if read == "pyramid" and level_mag > 1.5 * mag:
        record["note"] = f"no pyramid level near {mag_name(mag)}: read level {level.index} at {mag_name(level_mag)}"
    return record


def classify_slides(
    exported: ExportedModel, slides: list[str | Path], out: Path, options: PredictOptions, progress: bool | None = None
) -> list[dict]:
    """Each slide's result (or why it was skipped), in the given order; overlays go to `out`/overlays."""
    results = []
    exported.min_side  # noqa: B018 -- probed once before the slides: a slide's fault is never the probe's
    for path in tqdm(
        slides,
        desc=f"predict @ {mag_name(exported.mag)}",
        unit="slide",
        disable=None if progress is None else not progress,
    ):
        check_interrupted()
        try:
            results.append(predict_slide(exported, path, out, options))
        except NonFiniteOutputError:
            raise  # the model is broken, not the slide: no class is written for any slide
        except Exception as err:  # noqa: BLE001 -- one slide's fault is that slide's row, the others go on
            if isinstance(err, OSError) and _in_folder(err.filename, out):
                raise  # the output cannot be written (full disk, read-only): no later slide could be either
            reason = str(err) if isinstance(err, HpcdistillError) else f"{path}: {type(err).__name__}: {one_line(err)}"
            print(f"hpcdistill: skipped: {reason}")
            results.append({"slide": slide_name(Path(path)), "path": str(path), "status": "skipped", "reason": reason})
    return results


def _in_folder(filename: Any, folder: Path) -> bool:
    return filename is not None and Path(filename).resolve().is_relative_to(folder.resolve())


def summarise(model_path: str | Path, exported: ExportedModel, options: PredictOptions) -> dict[str, Any]:
    """What predictions.json says about the model and the rules, before its per-slide results."""
    return {
        "model": str(model_path),
        "mag": exported.mag,
        "classes": exported.classes,
        "windowing": exported.windowing.to_dict(),
        "slide_rule": options.slide_rule,
        "slide_rule_means": SLIDE_RULES[options.slide_rule],
        "read": options.read or exported.source,
        "trained_on": exported.source,
        "mag_scale": slide_scale(options, exported).to_dict(),
        "stain_norm": exported.stain_norm.to_dict(),
        "model_seen": {k: sorted(v) for k, v in exported.seen.items()},  # its training and validation slides, patients
        "kappa_weights": kappa_weights_of(exported.config),
        "provenance": provenance(),  # how this prediction was made (an array's merge: the task that wrote the part)
        "model_provenance": exported.provenance,
    }


# What a finished prediction leaves in its folder: a rerun replaces it only with --overwrite.
PREDICT_RESULTS = ("predictions.json", "slides.csv", "tissues.csv", "scores.json")
PREDICT_FOLDERS = ("overlays", "geojson", "heatmaps", "tasks")  # written per slide: never through a link out of --out


def predict_slides(
    model_path: str | Path,
    slides: list[str | Path],
    out_dir: str | Path,
    *,
    device: str = "auto",
    options: PredictOptions | None = None,
    progress: bool | None = None,
    **fields: Any,
) -> dict:
    """Predict many slides in this process; writes tissues.csv, slides.csv and predictions.json into out_dir.
    `options`, or PredictOptions' `fields` (tissue=None: the default tissue parameters). `progress`: the bar (None:
    on a terminal)."""
    exported = load_exported(model_path)
    fields = {k: v for k, v in fields.items() if not (k == "tissue" and v is None)}
    opts = check_options(options or PredictOptions(**fields), exported)
    announce(model_path, exported, opts)
    exported.model.to(pick_device(device))
    out = Path(out_dir)
    check_slide_ids(slides)
    cohort = None
    if opts.labels:  # read once; a label the model does not know is refused before any slide is read
        from hpcdistill.predict.cohort_scores import cohort_labels

        cohort = cohort_labels(opts.labels, [{"path": s} for s in slides], exported.classes)
    with one_writer(out):
        results = classify_slides(exported, slides, out, opts, progress)
        summary = write_predictions(out, summarise(model_path, exported, opts), results, cohort)
        if opts.labels:  # the evaluation stack (scipy.stats among it) is imported only when there is scoring to do
            from hpcdistill.predict.cohort_scores import score_prediction

            summary["scores"] = score_prediction(out, results, summary, opts, cohort)
    return summary
