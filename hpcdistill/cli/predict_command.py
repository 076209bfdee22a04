"""`hpcdistill predict`: classify new slides with an exported model, here or as an array of tasks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hpcdistill.cli.array_flags import add_cluster_flags, cluster_resources, run_array
from hpcdistill.cli.parsing import (
    add_mag_scale_flags,
    add_output_flags,
    add_roi_flags,
    add_stain_flags,
    add_tissue_flags,
    command,
    replace_finished,
    roi_options,
    tissue_params,
)
from hpcdistill.common.console import say


def _predict_options(args: argparse.Namespace) -> Any:
    from hpcdistill.predict.options import PredictOptions

    return PredictOptions(
        base_mag=args.base_mag,
        mag_from=args.mag_from,
        mpp_at_10x=args.mpp_at_10x,
        stain_norm=args.stain_norm,
        tissue=tissue_params(args),
        heatmap=args.heatmap,
        heatmap_class=args.heatmap_class,
        slide_rule=args.slide_rule,
        read=args.read,
        labels=args.labels,
        include_seen=args.include_seen,
        rois=roi_options(args),
    )


def _predict_array(args: argparse.Namespace, slides: list[Path]) -> dict[str, Any] | None:
    """`predict --cluster`: the array and its merge; the merged predictions.json, or None when not waited for."""
    import json

    from hpcdistill.models.export import load_exported
    from hpcdistill.predict.array import plan_predictions, predict_jobs
    from hpcdistill.predict.options import announce, check_options

    exported = load_exported(args.model)
    options = check_options(_predict_options(args), exported)  # before anything is queued
    announce(args.model, exported, options)
    plan = plan_predictions(args.model, slides, args.out, args.tasks, options, args.device)
    if (
        run_array(
            f"predict-{Path(args.out).name}", args.out, predict_jobs(plan, cluster_resources(args, "predict")), args
        )
        is None
    ):
        return None
    merged = json.loads((Path(args.out) / "predictions.json").read_text())
    for note in merged.get("notes", []):  # said in the merge job's log; said here where the user reads
        say(note)
    return merged


def add_predict(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "predict", run_predict)
    p.add_argument("model", help="exported weights (best.pt)")
    p.add_argument("slides", nargs="+", help="slide files, directories or globs")
    p.add_argument("--out", required=True, help="folder for tissues.csv, slides.csv, predictions.json, overlays/")
    add_mag_scale_flags(p, model_decides=True)
    add_stain_flags(p, model_decides=True)
    p.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda or cuda:N")
    p.add_argument(
        "--slide-rule",
        choices=["mean", "max"],
        default="mean",
        help="slide call: mean = tissue-area-weighted mean probability; max = per class the highest tissue probability",
    )
    _add_label_flags(p)
    p.add_argument(
        "--read",
        choices=["pyramid", "level0"],
        help="where windows are read: pyramid = the smallest pyramid level at or above the model's magnification "
        "(far fewer pixels decoded); level0 = Lanczos from level 0 (the paper). Default: what the model's "
        "training shards were cut from (`shard --source`)",
    )
    p.add_argument(
        "--heatmap",
        action="store_true",
        help="also write class-activation heat maps (overlay PNG, .npy arrays) and CAM cells in the GeoJSON",
    )
    p.add_argument("--heatmap-class", help="the class whose probability the heat map shows (default: the slide's call)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="plan and print only: each slide's tissues, windows and the pyramid level read (with --cluster: the "
        "array and its sbatch scripts); nothing is classified or written",
    )
    add_output_flags(
        p,
        "threads decoding slides and running the network, and CPUs per array task (0: the libraries' defaults, "
        "every core here; 1 CPU per array task)",
        default_workers=0,
    )
    add_cluster_flags(p, "classifying")
    add_tissue_flags(p)
    add_roi_flags(p, labels=False)


def _add_label_flags(p: argparse.ArgumentParser) -> None:
    """A lab's own labels: the cohort scores, and whether the model's own slides count in them."""
    p.add_argument(
        "--labels",
        help="labels CSV (slide, patient, label, as shard reads): score the slide calls, and the patient calls where "
        "it names patients, with bootstrap CIs, into scores.json",
    )
    p.add_argument(
        "--include-seen",
        action="store_true",
        help="with --labels: score the slides the model trained, validated or distilled on too (left out by default: "
        "their scores are not a test)",
    )


def run_predict(args: argparse.Namespace) -> int:
    """classify the tissues of new slides (e.g. low-resolution scans)

    Finds each slide's tissues, cuts them into the windows the model's training shards used, reads each at the
    model's magnification (from the pyramid or from level 0, as its training shards were cut) and classifies it;
    the slide call is the area-weighted mean of the window probabilities. Writes tissues.csv, slides.csv,
    predictions.json and an overlay PNG per slide. With --cluster, the slides are split over an array of tasks and
    merged in slide order.
    """
    from hpcdistill.common.output_folder import check_links
    from hpcdistill.predict.prediction import PREDICT_FOLDERS, PREDICT_RESULTS, predict_slides
    from hpcdistill.slides.catalog import collect_slides

    slides = collect_slides(args.slides)
    if args.dry_run and not args.cluster:
        return _print_preview(args, slides)
    if not args.dry_run:
        inputs = (args.model, args.labels, args.rois, *slides)
        check_links(args.out, PREDICT_FOLDERS)
        replace_finished(args.out, PREDICT_RESULTS, args.overwrite, inputs)
    use_threads(args.workers)
    if args.cluster:
        summary = _predict_array(args, slides)
        if summary is None:
            return 0
    else:
        options, progress = _predict_options(args), False if args.no_progress else None
        summary = predict_slides(args.model, slides, args.out, device=args.device, options=options, progress=progress)
    ok = [s for s in summary["slides"] if s["status"] == "ok"]
    for s in ok:
        print(f"{s['slide']}: {s['call']} ({len(s['tissues'])} tissues)")
    print(f"{len(ok)}/{len(summary['slides'])} slides classified; wrote {args.out}")
    return 0


def _print_preview(args: argparse.Namespace, slides: list[Path]) -> int:
    from hpcdistill.predict.preview import preview_lines, preview_slides

    print("\n".join(preview_lines(preview_slides(args.model, slides, _predict_options(args)))))
    return 0


def use_threads(workers: int) -> None:
    """`--workers` threads for torch's CPU kernels and libvips' decoding (set before pyvips is first used); 0 leaves
    both libraries' defaults."""
    import os

    import torch

    if workers > 0:
        torch.set_num_threads(workers)
        os.environ["VIPS_CONCURRENCY"] = str(workers)
