"""The run subcommands: `train`, `evaluate`, `report`, `flops`, `launch`, `status` and `demo`. Each is an
add_<name> (its argparse parser) and run_<name> (a thin call into the modules)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpcdistill.cli.array_flags import CLUSTERS
from hpcdistill.cli.parsing import add_output_flags, command, float_list, replace_finished
from hpcdistill.common.console import say
from hpcdistill.config.schema import ARCHS, STEMS
from hpcdistill.slides.windows import DEFAULT_MAGS


def add_train(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "train", run_train)
    p.add_argument("config", help="YAML config, e.g. configs/celiac/distill.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.mag=1.25 train.lr=5e-4"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="plan and print only: the resolved config, the budget line and the run folder; writes nothing",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: remove the run folder's earlier checkpoints, exports, logs and eval/ first (= "
        "run.resume=overwrite; not for a job that may be requeued, which would start over again)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines (= log.progress=false)")


def run_train(args: argparse.Namespace) -> int:
    """train a teacher, baseline, KD student or fine-tune (DeepSpeed; torchrun for several ranks)

    Train from shards. Precedence: key=value overrides > CONFIG file (and its base:) > defaults. Single process
    as is; several ranks under `torchrun --nproc-per-node N -m hpcdistill train ...`.
    """
    overrides = [*args.overrides]
    overrides += ["run.resume=overwrite"] if args.overwrite else []  # the flags are config keys: one source
    overrides += ["log.progress=false"] if args.no_progress else []
    if args.dry_run:
        from hpcdistill.train.dry_run import dry_run

        print(dry_run(args.config, overrides))
        return 0
    from hpcdistill.train.loop import main_train

    return main_train([args.config, *overrides])


def add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "evaluate", run_evaluate)
    p.add_argument("checkpoint", help="exported weights, e.g. runs/x/distill-2.5x/best.pt")
    p.add_argument("--shards", help="shard folder with manifest.json (default: the shards the model was trained on)")
    p.add_argument("--split", default="test", help="the manifest split to score")
    p.add_argument("--iterations", type=int, default=10000, help="bootstrap resamples")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the CIs")
    p.add_argument("--level", type=float, dest="old_level", help=argparse.SUPPRESS)  # deprecated: --confidence
    p.add_argument(
        "--unit",
        action="append",
        choices=["tissue", "slide", "patient"],
        help="what is scored: each tissue, each slide or each patient (repeat for several; default tissue); CIs "
        "resample that unit",
    )
    p.add_argument(
        "--slide-rule",
        choices=["mean", "max"],
        default="mean",
        help="how a slide's or patient's tissues make its call, as in predict",
    )
    p.add_argument("--by-slide", action="store_true", help="tissue unit: resample whole slides in the bootstrap")
    p.add_argument("--method", help="name in the report (default: from the run's config)")
    p.add_argument(
        "--study",
        default="main",
        choices=["main", "ablation"],
        help="which report table the result goes to: the main comparison or the pixel-loss ablation",
    )
    p.add_argument("--out", help="output folder (default <checkpoint folder>/eval)")
    p.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda or cuda:N")
    add_output_flags(p, "loader processes decoding the shards (0: in this process)", default_workers=0)


def run_evaluate(args: argparse.Namespace) -> int:
    """metrics with bootstrap CIs and GFLOPs of an exported model on a split

    Writes <run>/eval/<split>.json and <split>_predictions.csv. The magnification comes from the checkpoint.
    """
    from hpcdistill.evaluate.evaluation import evaluate_checkpoint
    from hpcdistill.evaluate.options import EvalOptions
    from hpcdistill.evaluate.report import format_ci
    from hpcdistill.scoring.metrics import METRIC_TITLES

    confidence = args.confidence
    if args.old_level is not None:
        say("evaluate --level is deprecated (it reads like a pyramid level): use --confidence")
        confidence = args.old_level
    out = args.out or str(Path(args.checkpoint).parent / "eval")
    inputs = (args.checkpoint, args.shards)
    replace_finished(out, (f"{args.split}.json", f"{args.split}_predictions.csv"), args.overwrite, inputs)
    options = EvalOptions(
        split=args.split,
        method=args.method,
        study=args.study,
        iterations=args.iterations,
        confidence=confidence,
        by_slide=args.by_slide,
        out=args.out,
        device=args.device,
        workers=args.workers,
        units=tuple(args.unit or ["tissue"]),
        slide_rule=args.slide_rule,
        progress=False if args.no_progress else None,
    )
    record = evaluate_checkpoint(args.checkpoint, args.shards or recorded_shards(args.checkpoint), options)
    for unit, scores in record["units"].items():
        print(f"{record['method']} @ {record['mag']:g}x on {args.split}, {scores['n']} {unit}s:")
        for metric, value in scores["metrics"].items():
            print(f"  {METRIC_TITLES[metric]:<21} {'n/a' if value is None else format_ci(tuple(value))}")
    print(f"  {'GFLOPs':<21} {record['gflops']['median']:.4g} per forward pass at the median tissue size")
    print(f"wrote {record['path']}")
    return 0


def recorded_shards(checkpoint: str) -> str:
    """The shard folder the export was trained on, as its config records it; one line when it is not there."""
    from hpcdistill.common.errors import CommandError
    from hpcdistill.config.schema import resolve_path
    from hpcdistill.models.export import load_exported

    named = load_exported(checkpoint).config.get("data", {}).get("shards")
    folder = resolve_path(named) if named else None
    if folder is None or not (folder / "manifest.json").is_file():
        raise CommandError(
            f"{checkpoint}: records no shard folder it was trained on"
            + (f" that still holds a manifest.json ({named})" if named else "")
            + "; pass --shards"
        )
    return str(folder)


def add_report(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "report", run_report)
    p.add_argument("runs", nargs="+", help="run folders (their eval/*.json) or evaluation JSON files")
    p.add_argument("--out", required=True, help="folder for report.md, figure3.png (and ablation.png)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished earlier report in --out (refused without it); only files this command writes",
    )


def run_report(args: argparse.Namespace) -> int:
    """Table 3/4 markdown and the Figure 3 plot from evaluated runs

    Reads every eval/*.json under the given run folders (written by `hpcdistill evaluate`) and writes report.md
    (the paper's Table 3/4 layouts, the ordering check) and figure3.png (accuracy against GFLOPs).
    """
    from hpcdistill.common.folder_lock import one_writer
    from hpcdistill.evaluate.report import load_results, write_report
    from hpcdistill.evaluate.report_provenance import provenance_warning
    from hpcdistill.evaluate.report_units import absent_lines

    results = load_results(args.runs)
    replace_finished(args.out, ("report.md",), args.overwrite, tuple(args.runs))  # like every other command's --out
    for line in absent_lines(results):  # on the terminal too, never only inside the report
        say(line.removeprefix("- "))
    if warning := provenance_warning(results):
        say(f"{args.out}: {warning}")
    with one_writer(Path(args.out)):
        path = write_report(results, args.out)
    print(f"wrote {path}")
    return 0


def add_flops(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "flops", run_flops)
    p.add_argument("--arch", default="resnet18", choices=ARCHS, help="GroupNorm ResNet depth")
    p.add_argument("--width", type=int, default=64, help="channels of the first stage (64 = the standard ResNet)")
    p.add_argument(
        "--stem",
        default="standard",
        choices=STEMS,
        help="input stem: standard (stride 4), halfres (2) or lowres (1, for tiny low-magnification inputs)",
    )
    p.add_argument("--num-classes", type=int, default=3, help="classifier outputs")
    p.add_argument(
        "--mags",
        type=float_list,
        default=list(DEFAULT_MAGS),
        help="comma-separated magnifications (default 10,5,2.5,1.25,0.625)",
    )
    p.add_argument("--manifest", help="shard folder or manifest.json: adds median/mean tissue sizes")
    p.add_argument("--checkpoint", help="exported weights: use its architecture instead of --arch/--width/--stem")


def run_flops(args: argparse.Namespace) -> int:
    """GFLOPs per forward pass per magnification (FLOPs = 2 x multiply-adds)

    GFLOPs of one forward pass at a fixed field of view per magnification, and at the shards' median and mean
    tissue sizes with --manifest.
    """
    from hpcdistill.models.resnet import build_model
    from hpcdistill.scoring.flops import FIXED_SIZE_10X, flops_per_mag
    from hpcdistill.shards.manifest import read_manifest

    if args.checkpoint:
        from hpcdistill.models.export import load_exported

        model = load_exported(args.checkpoint).model
    else:
        model = build_model(args.arch, args.num_classes, width=args.width, stem=args.stem)
    manifest = None
    if args.manifest:
        path = Path(args.manifest)
        manifest = read_manifest(path if path.is_dir() else path.parent)
    rows = flops_per_mag(model, args.mags, manifest)
    print(
        f"GFLOPs per forward pass (FLOPs = 2 x multiply-adds; torchvision's '1.814 GFLOPS' for resnet18 is "
        f"multiply-adds). Fixed field of view: {FIXED_SIZE_10X} px at 10x."
    )
    header = f"{'mag':>7} {'fixed px':>9} {'fixed':>9}" + (
        f" {'median px':>10} {'median':>9} {'mean':>9}" if manifest else ""
    )
    print(header)
    for r in rows:
        line = f"{r['mag']:>6g}x {r['fixed_size'][0]:>9} {r['fixed']:>9.4g}"
        if manifest and "median_size" in r:
            line += f" {'x'.join(map(str, r['median_size'])):>10} {r['median']:>9.4g} {r['mean']:>9.4g}"
        print(line)
    return 0


def add_launch(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "launch", run_launch)
    p.add_argument("experiment", help="experiment YAML, e.g. configs/experiments/celiac.yaml")
    p.add_argument(
        "--cluster",
        default="slurm",
        choices=CLUSTERS,
        help="slurm: sbatch through submitit; local: processes on this machine; debug: in this process",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="plan and print only: the sbatch scripts and the dependency graph; nothing is submitted",
    )
    p.add_argument("--wait", action="store_true", help="slurm: wait for every job and fail if one fails")


def run_launch(args: argparse.Namespace) -> int:
    """submit an experiment's job graph through submitit (SLURM arrays per method)

    Teacher -> one array per method (a task per magnification) -> evaluation and report, with afterok
    dependencies. Records every job in <exp dir>/launch.json (read by `hpcdistill status`).
    """
    from hpcdistill.experiment.launch import launch_experiment

    record = launch_experiment(args.experiment, cluster=args.cluster, dry_run=args.dry_run, wait=args.wait)
    if not args.dry_run:
        print(f"launched {len(record['jobs'])} jobs; follow them with: hpcdistill status {record['exp_dir']}")
    return 0


def add_status(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "status", run_status)
    p.add_argument("exp_dir", help="experiment folder (holds launch.json)")


def run_status(args: argparse.Namespace) -> int:
    """jobs of a launch: states, logs, TensorBoard folders

    Reads <exp dir>/launch.json: each job's state (from SLURM, or from the local processes), its training
    progress, logs and TensorBoard folder.
    """
    from hpcdistill.cluster.status import experiment_status, format_status

    print(format_status(experiment_status(args.exp_dir)))
    return 0


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "demo", run_demo)
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a shortened run (CI): fewer slides, one epoch")
    p.add_argument(
        "--cluster",
        default="local",
        choices=CLUSTERS,
        help="where the jobs run, as in `launch`: local processes, SLURM, or debug (in this process)",
    )
    p.add_argument("--slurm", action="store_true", help=argparse.SUPPRESS)  # deprecated: --cluster slurm
    p.add_argument("--workers", type=int, default=2, help="slide writing and sharding processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic slides and the splits")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="training seeds: every run is repeated for seeds 0..N-1 and the report pools them",
    )


def run_demo(args: argparse.Namespace) -> int:
    """the paper's experiment end to end on an embedded synthetic dataset

    synth -> shard -> teacher, baseline, KD and KD with two aux sets at two low magnifications -> evaluation
    with CIs and GFLOPs -> report. Resumable.
    """
    from hpcdistill.experiment.demo import run_demo as demo

    cluster = args.cluster
    if args.slurm:
        say("demo --slurm is deprecated: use --cluster slurm")
        cluster = "slurm"
    demo(args.out, quick=args.quick, cluster=cluster, workers=args.workers, seed=args.seed, seeds=args.seeds)
    return 0
