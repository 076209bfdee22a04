"""The data subcommands: `synth` (synthetic slides), `shard` (slides -> shards, or its dry run) and `predict`
(classify new slides). Each is an add_<name> (its argparse parser) and run_<name> (a thin call into the modules)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from hpcdistill.cli_cluster import add_cluster_flags, cluster_resources, run_array

from hpcdistill.errors import HpcdistillError


def command(subparsers: argparse._SubParsersAction, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """The subparser of `run_<name>`: its docstring's first line is the one-line help, the rest the description."""
    summary, _, description = inspect.cleandoc(run.__doc__ or "").partition("\n\n")
    parser = subparsers.add_parser(run.__name__.removeprefix("run_"), help=summary,
                                   description=" ".join(description.split()))
    parser.set_defaults(func=run)
    return parser


def float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None


def _split_counts(text: str) -> dict[str, int]:
    """'train=4,val=2,test=2,aux=4' -> {'train': 4, ...}."""
    counts = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{part!r}: expected split=count, e.g. train=4,val=2")
        counts[name.strip()] = int(value)
    return counts


def _field_type(field: dataclasses.Field, default: object) -> Callable[[str], object]:
    """int/float/str from the default, or from the annotation when the default is None (e.g. 'float | None')."""
    if default is not None:
        return type(default)
    annotation = str(field.type)
    return float if "float" in annotation else int if "int" in annotation else str


def _add_tissue_flags(parser: argparse.ArgumentParser) -> None:
    """One --tissue-<field> flag per tissue.TissueParams field, mirroring its name and default."""
    from hpcdistill.tissue import TissueParams

    group = parser.add_argument_group("tissue localization (hpcdistill.tissue.TissueParams)")
    defaults = TissueParams()
    for field in dataclasses.fields(TissueParams):
        default = getattr(defaults, field.name)
        flag, dest = f"--tissue-{field.name.replace('_', '-')}", f"tissue_{field.name}"
        if isinstance(default, bool):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                               help=field.metadata["help"])
        else:
            group.add_argument(flag, dest=dest, type=_field_type(field, default), default=default,
                               help=field.metadata["help"])


def _tissue_params(args: argparse.Namespace):
    from hpcdistill.tissue import TissueParams

    return TissueParams(**{f.name: getattr(args, f"tissue_{f.name}") for f in dataclasses.fields(TissueParams)})


def add_shard(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, run_shard)
    from hpcdistill.shard_plan import ShardParams

    defaults = ShardParams()
    p.add_argument("inputs", nargs="+", help="slide files, directories (searched recursively) or globs")
    p.add_argument("--out", required=True, help="output folder for shards, manifest.json and qc/")
    p.add_argument("--labels", help="labels CSV with columns slide,patient,label,split")
    p.add_argument("--mags", type=float_list, default=list(defaults.mags),
                   help=f"magnifications (default {','.join(f'{m:g}' for m in defaults.mags)})")
    p.add_argument("--base-mag", type=float, help="override the base magnification read from metadata")
    p.add_argument("--max-size", type=int, default=defaults.max_size,
                   help=f"split tissues larger than this many 10x px into aligned windows (default {defaults.max_size})")
    p.add_argument("--format", choices=["jpg", "png"], default=defaults.image_format, dest="image_format",
                   help="image encoding in the shards (png is lossless and several times larger)")
    p.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality, help="JPEG quality, 1-100")
    p.add_argument("--shard-size", default="1GB", help="cap per shard in bytes, e.g. 256MB (default 1GB)")
    p.add_argument("--shard-max-samples", type=int, help="cap per shard in samples")
    p.add_argument("--split-ratios", type=float_list, default=list(defaults.split_ratios),
                   help="train,val,test ratios for labeled slides without a split (patient level, per class; "
                        f"default {','.join(f'{r:g}' for r in defaults.split_ratios)})")
    p.add_argument("--classes", type=lambda text: [c.strip() for c in text.split(",")],
                   help="class order (= label ids), e.g. normal,duodenitis,celiac (default: labels sorted)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the patient-level split assignment")
    p.add_argument("--workers", type=int, default=1, help="slides processed in parallel")
    p.add_argument("--overwrite", action="store_true", help="delete earlier shards/manifest in --out first")
    p.add_argument("--strict", action="store_true", help="fail (exit 2) if any slide is skipped")
    p.add_argument("--dry-run", action="store_true",
                   help="plan only: splits, labels, base mags, tissues and samples per slide, skips with reasons; "
                        "writes just qc/*.png and plan.json to --out (check tissue finding before a long run). "
                        "With --cluster: the slides per task and the sbatch scripts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cluster_flags(p, "cutting")
    _add_tissue_flags(p)


def run_shard(args: argparse.Namespace) -> int:
    """slides -> aligned multi-magnification WebDataset shards

    Cut every tissue of every slide at each magnification (Lanczos from level 0) into {split}-NNNNNN.tar shards
    with a manifest.json.
    """
    from hpcdistill import sharding
    from hpcdistill.shard_plan import ShardParams, parse_size

    params = ShardParams(
        mags=tuple(args.mags), max_size=args.max_size, image_format=args.image_format,
        jpeg_quality=args.jpeg_quality, shard_size=parse_size(args.shard_size),
        shard_max_samples=args.shard_max_samples, base_mag=args.base_mag, split_ratios=tuple(args.split_ratios),
        seed=args.seed, classes=tuple(args.classes) if args.classes else None, tissue=_tissue_params(args))
    if args.cluster:
        return _shard_array(args, params)
    if args.dry_run:
        return print_shard_plan(sharding.preview_sharding(args.inputs, args.out, labels_csv=args.labels, params=params,
                                                          workers=args.workers), args.out, args.strict)
    manifest = sharding.run_sharding(args.inputs, args.out, labels_csv=args.labels, params=params,
                                     workers=args.workers, overwrite=args.overwrite, strict=args.strict,
                                     progress=False if args.no_progress else None)
    return print_manifest(manifest, args.out)


def _shard_array(args: argparse.Namespace, params: Any) -> int:
    """`shard --cluster`: the array of tasks and its merge, through the launcher."""
    from hpcdistill.job_graph import shard_jobs
    from hpcdistill.manifest import read_manifest
    from hpcdistill.shard_tasks import describe_plan, plan_array

    plan = plan_array(args.inputs, args.out, labels_csv=args.labels, params=params, tasks=args.tasks,
                      overwrite=args.overwrite and not args.dry_run)
    jobs = shard_jobs(plan, cluster_resources(args), args.workers, args.strict)
    if args.dry_run:
        print(describe_plan(plan))
    if not jobs:
        print(f"hpcdistill: {args.out}: already complete with these parameters; nothing to do", file=sys.stderr)
    elif run_array(f"shard-{Path(args.out).name}", args.out, jobs, args) is None:
        return 0
    return 0 if args.dry_run else print_manifest(read_manifest(args.out), args.out, list_skipped=True)


def _predict_options(args: argparse.Namespace) -> Any:
    from hpcdistill.predict import PredictOptions

    return PredictOptions(base_mag=args.base_mag, tissue=_tissue_params(args), heatmap=args.heatmap,
                          heatmap_class=args.heatmap_class, slide_rule=args.slide_rule)


def _predict_array(args: argparse.Namespace, slides: list[Path]) -> dict[str, Any] | None:
    """`predict --cluster`: the array and its merge; the merged predictions.json, or None when not waited for."""
    import json

    from hpcdistill.job_graph import predict_jobs
    from hpcdistill.predict_tasks import plan_predictions

    from hpcdistill.predict import check_options
    from hpcdistill.run_folder import load_exported

    options = check_options(_predict_options(args), load_exported(args.model).classes)  # before anything is queued
    plan = plan_predictions(args.model, slides, args.out, args.tasks, options, args.device)
    if run_array(f"predict-{Path(args.out).name}", args.out, predict_jobs(plan, cluster_resources(args)), args) is None:
        return None
    return json.loads((Path(args.out) / "predictions.json").read_text())


def print_manifest(manifest: dict[str, Any], out: str, list_skipped: bool = False) -> int:
    """The manifest's splits; the skipped slides' reasons too when the tasks' own logs are not on this terminal."""
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['samples']} samples, {entry['tissues']} tissues, {entry['slides']} slides, "
              f"{entry['patients']} patients, {len(entry['shards'])} shards")
    skipped = [s["reason"] for s in manifest["slides"].values() if s["status"] != "ok"]
    for reason in skipped if list_skipped else []:
        print(f"skipped: {reason}")
    print(f"{out}/manifest.json: {len(manifest['slides']) - len(skipped)} slides ok, {len(skipped)} skipped")
    return 0


def print_shard_plan(plan: dict, out: str, strict: bool) -> int:
    skipped = [row for row in plan["slides"] if row["status"] != "ok"]
    for split, entry in plan["splits"].items():
        classes = ", ".join(f"{c} {n}" for c, n in entry["class_slides"].items() if n)
        print(f"{split}: {entry['samples']} samples, {entry['tissues']} tissues, {entry['slides']} slides, "
              f"{entry['patients']} patients" + (f" (slides per class: {classes})" if classes else ""))
    for row in skipped:
        print(f"skipped: {row['reason']}")
    print(f"{out}/plan.json: {len(plan['slides']) - len(skipped)} slides ok, {len(skipped)} would be skipped; "
          f"QC images in {out}/qc/ (nothing sharded: --dry-run)")
    return 2 if strict and skipped else 0


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 4096x3072")
    return int(width), int(height)


def _classes(text: str) -> int | list[str]:
    return int(text) if text.isdigit() else [c.strip() for c in text.split(",") if c.strip()]


def add_synth(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, run_synth)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--slides-per-split", type=_split_counts, default={"train": 9, "val": 3, "test": 3},
                   help="labeled slides per split, e.g. train=9,val=3,test=3")
    p.add_argument("--aux1", type=int, default=3, help="unlabeled slides in split aux1 (ADv1)")
    p.add_argument("--aux2", type=int, default=3, help="more unlabeled slides in split aux2 (ADv2 = aux1 + aux2)")
    p.add_argument("--classes", type=_classes, default=3, help="a count (2-5) or comma-separated class names")
    p.add_argument("--size", type=_size, default=(4096, 3072), help="level-0 size of a 40x slide, WIDTHxHEIGHT")
    p.add_argument("--tissues", type=float_list, default=[2, 4], help="min,max tissue pieces per slide")
    p.add_argument("--signal", type=float, default=1.0, help="class signal strength (0 = indistinguishable)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw: the same seed writes the same slides")


def run_synth(args: argparse.Namespace) -> int:
    """write synthetic H&E-like slides and a labels CSV

    Synthetic pyramidal TIFF / Aperio SVS slides (40x and 20x) whose class lives in high-magnification detail,
    plus labels.csv.
    """
    from hpcdistill import synthetic

    if len(args.tissues) != 2:
        raise HpcdistillError(f"--tissues {args.tissues}: expected min,max")
    paths, labels_csv = synthetic.write_dataset(
        args.out, n_slides_per_split=args.slides_per_split, classes=args.classes, n_aux1=args.aux1,
        n_aux2=args.aux2, size=args.size, n_tissues=(int(args.tissues[0]), int(args.tissues[1])),
        signal=args.signal, seed=args.seed)
    print(f"{args.out}: {len(paths)} slides and {Path(labels_csv).name}")
    return 0


def add_predict(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, run_predict)
    p.add_argument("model", help="exported weights (best.pt)")
    p.add_argument("slides", nargs="+", help="slide files, directories or globs")
    p.add_argument("--out", required=True, help="folder for tissues.csv, slides.csv, predictions.json, overlays/")
    p.add_argument("--base-mag", type=float, help="override the base magnification read from metadata")
    p.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda or cuda:N")
    p.add_argument("--slide-rule", choices=["mean", "max"], default="mean",
                   help="slide call: mean = tissue-area-weighted mean probability; max = per class the highest tissue "
                        "probability")
    p.add_argument("--heatmap", action="store_true",
                   help="also write class-activation heat maps (overlay PNG, .npy arrays) and CAM cells in the GeoJSON")
    p.add_argument("--heatmap-class", help="the class whose probability the heat map shows (default: the slide's call)")
    p.add_argument("--dry-run", action="store_true", help="with --cluster: print the array and its sbatch scripts only")
    add_cluster_flags(p, "classifying")
    _add_tissue_flags(p)


def run_predict(args: argparse.Namespace) -> int:
    """classify the tissues of new slides (e.g. low-resolution scans)

    Finds each slide's tissues, cuts them into the windows the model's training shards used, reads each at the
    model's magnification (Lanczos from level 0, as in training) and classifies it; the slide call is the
    area-weighted mean of the window probabilities. Writes tissues.csv, slides.csv, predictions.json and an
    overlay PNG per slide. With --cluster, the slides are split over an array of tasks and merged in slide order.
    """
    from hpcdistill.predict import predict_slides
    from hpcdistill.slide_catalog import collect_slides

    slides = collect_slides(args.slides)
    if args.cluster:
        summary = _predict_array(args, slides)
        if summary is None:
            return 0
    else:
        summary = predict_slides(args.model, slides, args.out, device=args.device, options=_predict_options(args))
    ok = [s for s in summary["slides"] if s["status"] == "ok"]
    for s in ok:
        print(f"{s['slide']}: {s['call']} ({len(s['tissues'])} tissues)")
    print(f"{len(ok)}/{len(summary['slides'])} slides classified; wrote {args.out}")
    return 0


