"""The data subcommands: `synth` (synthetic slides) and `shard` (slides -> shards, or its dry run). Each is an
add_<name> (its argparse parser) and run_<name> (a thin call into the stage it runs)."""

from __future__ import annotations

import argparse
import sys
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
    float_list,
    mag_scale,
    replace_finished,
    roi_options,
    stain_norm,
    tissue_params,
)
from hpcdistill.common.errors import CommandError


def _split_counts(text: str) -> dict[str, int]:
    """'train=4,val=2,test=2,aux=4' -> {'train': 4, ...}."""
    counts = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{part!r}: expected split=count, e.g. train=4,val=2")
        counts[name.strip()] = int(value)
    return counts


def add_shard(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "shard", run_shard)
    from hpcdistill.shards.plan import ShardParams

    defaults = ShardParams()
    p.add_argument("inputs", nargs="+", help="slide files, directories (searched recursively) or globs")
    p.add_argument("--out", required=True, help="output folder for shards, manifest.json and qc/")
    p.add_argument("--labels", help="labels CSV with columns slide,patient,label,split")
    p.add_argument(
        "--mags",
        type=float_list,
        default=list(defaults.mags),
        help=f"magnifications (default {','.join(f'{m:g}' for m in defaults.mags)})",
    )
    add_mag_scale_flags(p, model_decides=False)
    add_stain_flags(p, model_decides=False)
    p.add_argument(
        "--source",
        choices=["level0", "pyramid"],
        default=defaults.source,
        help="cut each magnification from level 0 (the paper) or from the smallest pyramid level at or above it "
        "(the pixels `predict --read pyramid` sees)",
    )
    p.add_argument(
        "--max-size",
        type=int,
        default=defaults.max_size,
        help=f"split tissues larger than this many 10x px into aligned windows (default {defaults.max_size})",
    )
    p.add_argument(
        "--format",
        choices=["jpg", "png"],
        default=defaults.image_format,
        dest="image_format",
        help="image encoding in the shards (png is lossless and several times larger)",
    )
    p.add_argument(
        "--min-side",
        type=_min_side,
        default="auto",
        help="skip (and count) tissues with no window of this many px a side at every magnification (default auto: "
        "the smallest input of the default network, found by running it; training checks its own network too)",
    )
    _add_output_flags(p, defaults)
    add_cluster_flags(p, "cutting")
    add_tissue_flags(p)
    add_roi_flags(p, labels=True)


def _min_side(text: str) -> int | str:
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: a side in px (>= 1) or 'auto'")


def default_network_min_side() -> int:
    """The smallest square input of the network a default training config builds (models.inference.smallest_input)."""
    import torch

    from hpcdistill.config.schema import ModelConfig
    from hpcdistill.models.inference import smallest_input
    from hpcdistill.models.resnet import build_model

    model = ModelConfig()
    network = build_model(model.arch, model.num_classes, width=model.width, groups=model.groups, stem=model.stem)
    return smallest_input(network, torch.device("cpu"))


def _add_output_flags(p: argparse.ArgumentParser, defaults: Any) -> None:
    """How the shards are written and split, and how the run behaves."""
    p.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality, help="JPEG quality, 1-100")
    p.add_argument("--shard-size", default="1GB", help="cap per shard in bytes, e.g. 256MB (default 1GB)")
    p.add_argument("--shard-max-samples", type=int, help="cap per shard in samples")
    p.add_argument(
        "--split-ratios",
        type=float_list,
        default=list(defaults.split_ratios),
        help="train,val,test ratios for labeled slides without a split (patient level, per class; "
        f"default {','.join(f'{r:g}' for r in defaults.split_ratios)})",
    )
    p.add_argument(
        "--classes",
        type=lambda text: [c.strip() for c in text.split(",")],
        help="class order (= label ids), e.g. normal,duodenitis,celiac (default: labels sorted)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the patient-level split assignment")
    p.add_argument(
        "--name",
        default="",
        help="the dataset's name in reports, recorded in the manifest (default: the --out folder's name, or its "
        "parent's when it is called shards)",
    )
    add_output_flags(p, "slides cut in parallel (processes)")
    p.add_argument("--strict", action="store_true", help="fail (exit 2) if any slide is skipped")
    p.add_argument(
        "--aux-shares-patients",
        action="store_true",
        help="allow an aux (unlabelled) slide of a patient who is in train/val/test (refused by default: leakage)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="plan and print only: splits, labels, base mags, tissues and samples per slide, skips with reasons; "
        "writes just qc/*.png and plan.json to --out (check tissue finding before a long run). "
        "With --cluster: the slides per task and the sbatch scripts",
    )


def _shard_params(args: argparse.Namespace) -> Any:
    """The ShardParams the flags give."""
    from hpcdistill.shards.plan import ShardParams, parse_size

    return ShardParams(
        mags=tuple(args.mags),
        max_size=args.max_size,
        image_format=args.image_format,
        jpeg_quality=args.jpeg_quality,
        shard_size=parse_size(args.shard_size),
        shard_max_samples=args.shard_max_samples,
        base_mag=args.base_mag,
        split_ratios=tuple(args.split_ratios),
        seed=args.seed,
        classes=tuple(args.classes) if args.classes else None,
        tissue=tissue_params(args),
        source=args.source,
        aux_shares_patients=args.aux_shares_patients,
        min_side=default_network_min_side() if args.min_side == "auto" else args.min_side,
        rois=roi_options(args),
        mag_scale=mag_scale(args),
        stain=stain_norm(args),
    )


def run_shard(args: argparse.Namespace) -> int:
    """slides -> aligned multi-magnification WebDataset shards

    Cut every tissue of every slide at each magnification (Lanczos from level 0, or with --source pyramid from the
    level at or above it) into {split}-NNNNNN.tar shards with a manifest.json.
    """
    from hpcdistill.shards import sharding

    params = _shard_params(args)
    if args.cluster:
        return _shard_array(args, params)
    if args.dry_run:
        return print_shard_plan(
            sharding.preview_sharding(
                args.inputs, args.out, labels_csv=args.labels, params=params, workers=args.workers
            ),
            args.out,
            args.strict,
        )
    manifest = sharding.run_sharding(
        args.inputs,
        args.out,
        labels_csv=args.labels,
        params=params,
        workers=args.workers,
        overwrite=args.overwrite,
        strict=args.strict,
        progress=False if args.no_progress else None,
        name=args.name,
    )
    return print_manifest(manifest, args.out)


def _shard_array(args: argparse.Namespace, params: Any) -> int:
    """`shard --cluster`: the array of tasks and its merge, through the launcher."""
    from hpcdistill.shards.array import describe_plan, plan_array, shard_jobs
    from hpcdistill.shards.manifest import read_manifest

    plan = plan_array(
        args.inputs,
        args.out,
        labels_csv=args.labels,
        params=params,
        tasks=args.tasks,
        overwrite=args.overwrite and not args.dry_run,
        name=args.name,
    )
    jobs = shard_jobs(plan, cluster_resources(args, "shard"), args.workers, args.strict)
    if args.dry_run:
        print(describe_plan(plan))
    if not jobs:
        print(f"hpcdistill: {args.out}: already complete with these parameters; nothing to do", file=sys.stderr)
    elif run_array(f"shard-{Path(args.out).name}", args.out, jobs, args) is None:
        return 0
    return 0 if args.dry_run else print_manifest(read_manifest(args.out), args.out, list_skipped=True)


def print_manifest(manifest: dict[str, Any], out: str, list_skipped: bool = False) -> int:
    """The manifest's splits; the skipped slides' reasons too when the tasks' own logs are not on this terminal."""
    for split, entry in manifest["splits"].items():
        print(
            f"{split}: {entry['samples']} samples, {entry['tissues']} tissues, {entry['slides']} slides, "
            f"{entry['patients']} patients, {len(entry['shards'])} shards"
        )
    skipped = [s["reason"] for s in manifest["slides"].values() if s["status"] != "ok"]
    for reason in skipped if list_skipped else []:
        print(f"skipped: {reason}")
    small = sum(s.get("small_tissues") or 0 for s in manifest["slides"].values() if s["status"] == "ok")
    side = manifest["params"].get("min_side", 1)
    print(
        f"{out}/manifest.json: {len(manifest['slides']) - len(skipped)} slides ok, {len(skipped)} skipped"
        + (f"; {small} tissue(s) under {side} px skipped (--min-side)" if small else "")
    )
    return 0


def print_shard_plan(plan: dict, out: str, strict: bool) -> int:
    skipped = [row for row in plan["slides"] if row["status"] != "ok"]
    for split, entry in plan["splits"].items():
        classes = ", ".join(f"{c} {n}" for c, n in entry["class_slides"].items() if n)
        print(
            f"{split}: {entry['samples']} samples, {entry['tissues']} tissues, {entry['slides']} slides, "
            f"{entry['patients']} patients" + (f" (slides per class: {classes})" if classes else "")
        )
    for row in skipped:
        print(f"skipped: {row['reason']}")
    print(
        f"{out}/plan.json: {len(plan['slides']) - len(skipped)} slides ok, {len(skipped)} would be skipped; "
        f"QC images in {out}/qc/ (nothing sharded: --dry-run)"
    )
    return 2 if strict and skipped else 0


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 4096x3072")
    return int(width), int(height)


def _classes(text: str) -> int | list[str]:
    return int(text) if text.isdigit() else [c.strip() for c in text.split(",") if c.strip()]


def add_synth(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "synth", run_synth)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--slides-per-split",
        type=_split_counts,
        default={"train": 9, "val": 3, "test": 3},
        help="labeled slides per split, e.g. train=9,val=3,test=3",
    )
    p.add_argument("--aux1", type=int, default=3, help="unlabeled slides in split aux1 (ADv1)")
    p.add_argument("--aux2", type=int, default=3, help="more unlabeled slides in split aux2 (ADv2 = aux1 + aux2)")
    p.add_argument("--classes", type=_classes, default=3, help="a count (2-5) or comma-separated class names")
    p.add_argument("--size", type=_size, default=(4096, 3072), help="level-0 size of a 40x slide, WIDTHxHEIGHT")
    p.add_argument("--tissues", type=float_list, default=[2, 4], help="min,max tissue pieces per slide")
    p.add_argument("--signal", type=float, default=1.0, help="class signal strength (0 = indistinguishable)")
    p.add_argument(
        "--site",
        type=int,
        default=0,
        help="the staining site: 0 the reference stain, any other a fixed shift of its H and E of the size seen "
        "between hospitals (for cross-site studies)",
    )
    p.add_argument(
        "--pyramid",
        choices=["render", "scanner"],
        default="render",
        help="render = every pyramid level drawn from the scene; scanner = each level the one above shrunk 4x "
        "(area filter) and JPEG-encoded again, as scanners write them",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of every random draw: the same seed writes the same slides"
    )
    add_output_flags(p, "slides written in parallel (processes; the slides are the same whatever the count)")


def _synth_slides(out: Path) -> list[Path]:
    """The slides an earlier `synth` wrote (its labels.csv's names, plain names in the folder): a smaller dataset
    written over a larger one must not leave slides that `shard` would then read."""
    import csv

    labels = out / "labels.csv"
    if not labels.is_file() or labels.is_symlink():
        return []
    with labels.open(newline="") as fh:
        names = [row.get("slide", "") for row in csv.DictReader(fh)]
    return [out / name for name in names if name and Path(name).name == name and not (out / name).is_symlink()]


def run_synth(args: argparse.Namespace) -> int:
    """write synthetic H&E-like slides and a labels CSV

    Synthetic pyramidal TIFF / Aperio SVS slides (40x and 20x) whose class lives in high-magnification detail,
    plus labels.csv.
    """
    from hpcdistill.common.folder_lock import one_writer
    from hpcdistill.synthetic import dataset
    from hpcdistill.synthetic.specs import DatasetSpec

    if len(args.tissues) != 2:
        raise CommandError(f"--tissues {args.tissues}: expected min,max")
    earlier = _synth_slides(Path(args.out)) if args.overwrite else []
    replace_finished(args.out, ("labels.csv",), args.overwrite)  # before the lock: it tells our folders from others'
    for path in earlier:
        path.unlink(missing_ok=True)
    with one_writer(args.out):
        paths, labels_csv = dataset.write_dataset(
            args.out,
            DatasetSpec(
                slides_per_split=args.slides_per_split,
                classes=args.classes,
                aux1=args.aux1,
                aux2=args.aux2,
                size=args.size,
                tissues=(int(args.tissues[0]), int(args.tissues[1])),
                signal=args.signal,
                site=args.site,
                seed=args.seed,
                pyramid=args.pyramid,
            ),
            workers=args.workers,
            progress=False if args.no_progress else None,
        )
    print(f"{args.out}: {len(paths)} slides and {Path(labels_csv).name}")
    return 0
