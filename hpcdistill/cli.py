"""The `hpcdistill` command: argparse subcommands, each a thin call into one module.

To add a subcommand, write `add_<name>(subparsers)` that builds its parser and sets `func=<runner>`, and list it in
SUBCOMMANDS. Runners take the parsed namespace and return an exit code; HpcdistillError becomes one stderr line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Sequence

from hpcdistill import __version__
from hpcdistill.errors import HpcdistillError

PROG = "hpcdistill"


def _float_list(text: str) -> list[float]:
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


# --------------------------------------------------------------------------------------------------------- shard

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
    p = subparsers.add_parser("shard", help="slides -> aligned multi-magnification WebDataset shards",
                              description="Cut every tissue of every slide at each magnification (Lanczos from "
                                          "level 0) into {split}-NNNNNN.tar shards with a manifest.json.")
    from hpcdistill.sharding import ShardParams

    defaults = ShardParams()
    p.add_argument("inputs", nargs="+", help="slide files, directories (searched recursively) or globs")
    p.add_argument("--out", required=True, help="output folder for shards, manifest.json and qc/")
    p.add_argument("--labels", help="labels CSV with columns slide,patient,label,split")
    p.add_argument("--mags", type=_float_list, default=list(defaults.mags),
                   help=f"magnifications (default {','.join(f'{m:g}' for m in defaults.mags)})")
    p.add_argument("--base-mag", type=float, help="override the base magnification read from metadata")
    p.add_argument("--max-size", type=int, default=defaults.max_size,
                   help=f"split tissues larger than this many 10x px into aligned windows (default {defaults.max_size})")
    p.add_argument("--format", choices=["jpg", "png"], default=defaults.image_format, dest="image_format",
                   help="image encoding in the shards (png is lossless and several times larger)")
    p.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality, help="JPEG quality, 1-100")
    p.add_argument("--shard-size", default="1GB", help="cap per shard in bytes, e.g. 256MB (default 1GB)")
    p.add_argument("--shard-max-samples", type=int, help="cap per shard in samples")
    p.add_argument("--split-ratios", type=_float_list, default=list(defaults.split_ratios),
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
                        "writes just qc/*.png and plan.json to --out (check tissue finding before a long run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_tissue_flags(p)
    p.set_defaults(func=run_shard)


def run_shard(args: argparse.Namespace) -> int:
    from hpcdistill import sharding

    tissue_params = _tissue_params(args)
    params = sharding.ShardParams(
        mags=tuple(args.mags), max_size=args.max_size, image_format=args.image_format,
        jpeg_quality=args.jpeg_quality, shard_size=sharding.parse_size(args.shard_size),
        shard_max_samples=args.shard_max_samples, base_mag=args.base_mag, split_ratios=tuple(args.split_ratios),
        seed=args.seed, classes=tuple(args.classes) if args.classes else None, tissue=tissue_params)
    if args.dry_run:
        return print_shard_plan(sharding.preview_sharding(args.inputs, args.out, labels_csv=args.labels, params=params,
                                                          workers=args.workers), args.out, args.strict)
    manifest = sharding.run_sharding(args.inputs, args.out, labels_csv=args.labels, params=params,
                                     workers=args.workers, overwrite=args.overwrite, strict=args.strict,
                                     progress=False if args.no_progress else None)
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['samples']} samples, {entry['tissues']} tissues, {entry['slides']} slides, "
              f"{entry['patients']} patients, {len(entry['shards'])} shards")
    skipped = sum(1 for s in manifest["slides"].values() if s["status"] != "ok")
    print(f"{args.out}/manifest.json: {len(manifest['slides']) - skipped} slides ok, {skipped} skipped")
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


# --------------------------------------------------------------------------------------------------------- synth

def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 4096x3072")
    return int(width), int(height)


def _classes(text: str) -> int | list[str]:
    return int(text) if text.isdigit() else [c.strip() for c in text.split(",") if c.strip()]


def add_synth(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("synth", help="write synthetic H&E-like slides and a labels CSV",
                              description="Synthetic pyramidal TIFF / Aperio SVS slides (40x and 20x) whose class "
                                          "lives in high-magnification detail, plus labels.csv.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--slides-per-split", type=_split_counts, default={"train": 9, "val": 3, "test": 3},
                   help="labeled slides per split, e.g. train=9,val=3,test=3")
    p.add_argument("--aux1", type=int, default=3, help="unlabeled slides in split aux1 (ADv1)")
    p.add_argument("--aux2", type=int, default=3, help="more unlabeled slides in split aux2 (ADv2 = aux1 + aux2)")
    p.add_argument("--classes", type=_classes, default=3, help="a count (2-5) or comma-separated class names")
    p.add_argument("--size", type=_size, default=(4096, 3072), help="level-0 size of a 40x slide, WIDTHxHEIGHT")
    p.add_argument("--tissues", type=_float_list, default=[2, 4], help="min,max tissue pieces per slide")
    p.add_argument("--signal", type=float, default=1.0, help="class signal strength (0 = indistinguishable)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw: the same seed writes the same slides")
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from hpcdistill import synthetic

    if len(args.tissues) != 2:
        raise HpcdistillError(f"--tissues {args.tissues}: expected min,max")
    paths, labels_csv = synthetic.write_dataset(
        args.out, n_slides_per_split=args.slides_per_split, classes=args.classes, n_aux1=args.aux1,
        n_aux2=args.aux2, size=args.size, n_tissues=(int(args.tissues[0]), int(args.tissues[1])),
        signal=args.signal, seed=args.seed)
    print(f"{args.out}: {len(paths)} slides and {Path(labels_csv).name}")
    return 0


# ---------------------------------------------------------------------------------------------------------- train


def add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a teacher, baseline, KD student or fine-tune (DeepSpeed; torchrun for several ranks)",
        description="Train from shards. Precedence: key=value overrides > CONFIG file (and its base:) > defaults. "
                    "Single process as is; several ranks under `torchrun --nproc-per-node N -m hpcdistill.cli train ...`.")
    p.add_argument("config", help="YAML config, e.g. configs/celiac/distill.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.mag=1.25 train.lr=5e-4")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from hpcdistill.engine import main_train

    return main_train([args.config, *args.overrides])


# ---------------------------------------------------------------------------------------------------------- evaluate


def add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="metrics with bootstrap CIs and GFLOPs of an exported model on a split",
                              description="Writes <run>/eval/<split>.json and <split>_predictions.csv. The "
                                          "magnification comes from the checkpoint.")
    p.add_argument("checkpoint", help="exported weights, e.g. runs/x/distill-2.5x/best.pt")
    p.add_argument("--shards", required=True, help="shard folder with manifest.json")
    p.add_argument("--split", default="test", help="the manifest split to score")
    p.add_argument("--iterations", type=int, default=10000, help="bootstrap resamples")
    p.add_argument("--level", type=float, default=0.95, help="CI level")
    p.add_argument("--by-slide", action="store_true", help="resample whole slides, not tissues, in the bootstrap")
    p.add_argument("--method", help="name in the report (default: from the run's config)")
    p.add_argument("--study", default="main", choices=["main", "ablation"],
                   help="which report table the result goes to: the main comparison or the pixel-loss ablation")
    p.add_argument("--out", help="output folder (default <checkpoint folder>/eval)")
    p.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=0, help="loader processes decoding the shards")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from hpcdistill.evaluation import evaluate_checkpoint
    from hpcdistill.report import format_ci

    record = evaluate_checkpoint(args.checkpoint, args.shards, args.split, method=args.method, study=args.study,
                                 iterations=args.iterations, level=args.level, by_slide=args.by_slide,
                                 out_dir=args.out, device=args.device, workers=args.workers)
    print(f"{record['method']} @ {record['mag']:g}x on {args.split} ({record['samples']} samples):")
    for metric, value in record["metrics"].items():
        print(f"  {metric:<10} {format_ci(tuple(value))}")
    print(f"  GFLOPs     {record['gflops']['median']:.4g} per forward pass at the median tissue size")
    print(f"wrote {record['path']}")
    return 0


# ---------------------------------------------------------------------------------------------------------- report


def add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="Table 3/4 markdown and the Figure 3 plot from evaluated runs",
                              description="Reads every eval/*.json under the given run folders (written by `hpcdistill "
                                          "evaluate`) and writes report.md (the paper's Table 3/4 layouts, the "
                                          "ordering check) and figure3.png (accuracy against GFLOPs).")
    p.add_argument("runs", nargs="+", help="run folders (their eval/*.json) or evaluation JSON files")
    p.add_argument("--out", required=True, help="folder for report.md, figure3.png (and ablation.png)")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from hpcdistill.report import load_results, write_report

    path = write_report(load_results(args.runs), args.out)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------- predict


def add_predict(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="classify the tissues of new slides (e.g. low-resolution scans)",
                              description="Finds each slide's tissues, reads them at the model's magnification (Lanczos "
                                          "from level 0, as in training) and classifies each whole; the slide call is the "
                                          "area-weighted mean of the tissue probabilities. Writes tissues.csv, "
                                          "slides.csv, predictions.json and an overlay PNG per slide.")
    p.add_argument("model", help="exported weights (best.pt)")
    p.add_argument("slides", nargs="+", help="slide files, directories or globs")
    p.add_argument("--out", required=True, help="folder for tissues.csv, slides.csv, predictions.json, overlays/")
    p.add_argument("--base-mag", type=float, help="override the base magnification read from metadata")
    p.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda or cuda:N")
    _add_tissue_flags(p)
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from hpcdistill.predict import predict_slides
    from hpcdistill.sharding import collect_slides

    summary = predict_slides(args.model, collect_slides(args.slides), args.out, base_mag=args.base_mag,
                             tissue=_tissue_params(args), device=args.device)
    ok = [s for s in summary["slides"] if s["status"] == "ok"]
    for s in ok:
        print(f"{s['slide']}: {s['call']} ({len(s['tissues'])} tissues)")
    print(f"{len(ok)}/{len(summary['slides'])} slides classified; wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------- flops


def add_flops(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("flops", help="GFLOPs per forward pass per magnification (FLOPs = 2 x multiply-adds)",
                              description="GFLOPs of one forward pass at a fixed field of view per magnification, and "
                                          "at the shards' median and mean tissue sizes with --manifest.")
    p.add_argument("--arch", default="resnet18", choices=["resnet10", "resnet18", "resnet34", "resnet50"],
                   help="GroupNorm ResNet depth")
    p.add_argument("--width", type=int, default=64, help="channels of the first stage (64 = the standard ResNet)")
    p.add_argument("--stem", default="standard", choices=["standard", "halfres", "lowres"],
                   help="input stem: standard (stride 4), halfres (2) or lowres (1, for tiny low-magnification inputs)")
    p.add_argument("--num-classes", type=int, default=3, help="classifier outputs")
    p.add_argument("--mags", type=_float_list, default=[10, 5, 2.5, 1.25, 0.625],
                   help="comma-separated magnifications (default 10,5,2.5,1.25,0.625)")
    p.add_argument("--manifest", help="shard folder or manifest.json: adds median/mean tissue sizes")
    p.add_argument("--checkpoint", help="exported weights: use its architecture instead of --arch/--width/--stem")
    p.set_defaults(func=run_flops)


def run_flops(args: argparse.Namespace) -> int:
    from hpcdistill.data import read_manifest
    from hpcdistill.evaluation import FIXED_SIZE_10X, flops_per_mag
    from hpcdistill.models import build_model

    if args.checkpoint:
        from hpcdistill.run_folder import load_exported

        model = load_exported(args.checkpoint).model
    else:
        model = build_model(args.arch, args.num_classes, width=args.width, stem=args.stem)
    manifest = None
    if args.manifest:
        path = Path(args.manifest)
        manifest = read_manifest(path if path.is_dir() else path.parent)
    rows = flops_per_mag(model, args.mags, manifest)
    print(f"GFLOPs per forward pass (FLOPs = 2 x multiply-adds; torchvision's '1.814 GFLOPS' for resnet18 is "
          f"multiply-adds). Fixed field of view: {FIXED_SIZE_10X} px at 10x.")
    header = f"{'mag':>7} {'fixed px':>9} {'fixed':>9}" + (f" {'median px':>10} {'median':>9} {'mean':>9}" if manifest else "")
    print(header)
    for r in rows:
        line = f"{r['mag']:>6g}x {r['fixed_size'][0]:>9} {r['fixed']:>9.4g}"
        if manifest and "median_size" in r:
            line += f" {'x'.join(map(str, r['median_size'])):>10} {r['median']:>9.4g} {r['mean']:>9.4g}"
        print(line)
    return 0


# ---------------------------------------------------------------------------------------------------------- launch


def add_launch(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("launch", help="submit an experiment's job graph through submitit (SLURM arrays per method)",
                              description="Teacher -> one array per method (a task per magnification) -> evaluation "
                                          "and report, with afterok dependencies. Records every job in <exp "
                                          "dir>/launch.json (read by `hpcdistill status`).")
    p.add_argument("experiment", help="experiment YAML, e.g. configs/experiments/celiac.yaml")
    p.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="slurm: sbatch through submitit; local: processes on this machine; debug: in this process")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch scripts and dependency graph only")
    p.add_argument("--wait", action="store_true", help="slurm: wait for every job and fail if one fails")
    p.set_defaults(func=run_launch)


def run_launch(args: argparse.Namespace) -> int:
    from hpcdistill.launch import launch

    record = launch(args.experiment, cluster=args.cluster, dry_run=args.dry_run, wait=args.wait)
    if not args.dry_run:
        print(f"launched {len(record['jobs'])} jobs; follow them with: hpcdistill status {record['exp_dir']}")
    return 0


def add_status(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="jobs of a launch: states, logs, TensorBoard folders",
                              description="Reads <exp dir>/launch.json: each job's state (from SLURM, or from the "
                                          "local processes), its training progress, logs and TensorBoard folder.")
    p.add_argument("exp_dir", help="experiment folder (holds launch.json)")
    p.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    from hpcdistill.launch import format_status, status

    print(format_status(status(args.exp_dir)))
    return 0


# ---------------------------------------------------------------------------------------------------------- demo


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="the paper's experiment end to end on an embedded synthetic dataset",
                              description="synth -> shard -> teacher, baseline, KD and KD with two aux sets at two "
                                          "low magnifications -> evaluation with CIs and GFLOPs -> report. Resumable.")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a shortened run (CI): fewer slides, one epoch")
    p.add_argument("--slurm", action="store_true", help="run the jobs through `hpcdistill launch` on SLURM")
    p.add_argument("--workers", type=int, default=2, help="sharding processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic slides, the splits and every run")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from hpcdistill.demo import run_demo as demo

    demo(args.out, quick=args.quick, slurm=args.slurm, workers=args.workers, seed=args.seed)
    return 0


# ---------------------------------------------------------------------------------------------------------- main

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_synth, add_shard, add_train, add_evaluate, add_report, add_predict, add_flops, add_launch, add_status,
    add_demo,
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to show (required options, flags
    that are off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or action.required or "default" in (action.help or ""):
            return action.help  # nothing to show, or the help states its default itself (e.g. a list as typed)
        return super()._get_help_string(action)


class SubcommandParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Resolution-based distillation for histology.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=SubcommandParser)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def reference_markdown() -> str:
    """The README's CLI reference: each subcommand's one-line help and usage, at a fixed 100-column width.

    tests/test_readme.py checks the README holds exactly this text, so the reference cannot drift from --help.
    Regenerate with: python -c "from hpcdistill.cli import reference_markdown; print(reference_markdown())"
    """
    import os

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps usage to the terminal width
    try:
        parser = build_parser()
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        blocks = [f"#### `{PROG} {name}`: {helps[name]}\n\n```\n{sub.format_usage().strip()}\n```"
                  for name, sub in action.choices.items()]
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n\n".join(blocks)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HpcdistillError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
