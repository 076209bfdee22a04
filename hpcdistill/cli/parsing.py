"""What the subcommands share in building their parsers: a subcommand from its runner, comma-separated numbers,
the flags of every command that reads or writes many files (--workers, --overwrite, --no-progress), and the
tissue-localization and region flags that `shard` and `predict` both take."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path
from typing import Callable


def command(
    subparsers: argparse._SubParsersAction, name: str, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """The subparser `name` running `run`: its docstring's first line is the one-line help, the rest the
    description. The name is written at each call, so renaming a function never renames a command."""
    summary, _, description = inspect.cleandoc(run.__doc__ or "").partition("\n\n")
    parser = subparsers.add_parser(name, help=summary, description=" ".join(description.split()))
    parser.set_defaults(func=run)
    return parser


def float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None


def field_type(field: dataclasses.Field, default: object) -> Callable[[str], object]:
    """int/float/str from the default, or from the annotation when the default is None (e.g. 'float | None')."""
    if default is not None:
        return type(default)
    annotation = str(field.type)
    return float if "float" in annotation else int if "int" in annotation else str


def add_tissue_flags(parser: argparse.ArgumentParser) -> None:
    """One --tissue-<field> flag per tissue.TissueParams field, mirroring its name and default."""
    from hpcdistill.slides.tissue import TissueParams

    group = parser.add_argument_group("tissue localization (hpcdistill.slides.tissue.TissueParams)")
    defaults = TissueParams()
    for field in dataclasses.fields(TissueParams):
        default = getattr(defaults, field.name)
        flag, dest = f"--tissue-{field.name.replace('_', '-')}", f"tissue_{field.name}"
        if isinstance(default, bool):
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=field.metadata["help"]
            )
        else:
            group.add_argument(
                flag, dest=dest, type=field_type(field, default), default=default, help=field.metadata["help"]
            )


def tissue_params(args: argparse.Namespace):
    from hpcdistill.slides.tissue import TissueParams

    return TissueParams(**{f.name: getattr(args, f"tissue_{f.name}") for f in dataclasses.fields(TissueParams)})


def add_output_flags(parser: argparse.ArgumentParser, workers: str, default_workers: int = 1) -> None:
    """--workers, --overwrite and --no-progress, meaning the same in every command that has them."""
    parser.add_argument("--workers", type=int, default=default_workers, help=workers)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished earlier result in --out (refused without it); only files this command writes",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def replace_finished(out: str | None, finished: tuple[str, ...], overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse an --out holding a finished result unless --overwrite, and always one no hpcdistill command wrote, or
    where a result to replace is one of the command's `inputs`; with --overwrite, the earlier result's files go
    first, so a later fault never leaves an old result beside a new one (common/output_folder.py)."""
    from hpcdistill.common.output_folder import check_overwrite

    for path in check_overwrite(out, finished, overwrite, [i for i in inputs if i]) if out else []:
        path.unlink()


def add_roi_flags(parser: argparse.ArgumentParser, labels: bool) -> None:
    """The user's regions (QuPath GeoJSON), meaning the same in `shard` and `predict`."""
    group = parser.add_argument_group("your own regions (QuPath GeoJSON in level-0 px)")
    group.add_argument(
        "--rois",
        help="a folder of <slide id>.geojson files (QuPath's <image>.geojson too), or one such file; e.g. shard's "
        "own qc/ outlines after editing them in QuPath",
    )
    group.add_argument(
        "--roi-mode",
        choices=["inside", "outside", "ignore"],
        default="inside",
        help="keep the tissue inside the regions, remove the tissue under them (pen marks, folds), or ignore them",
    )
    group.add_argument(
        "--roi-missing",
        choices=["skip", "tissue"],
        default="skip",
        help="a slide without a region file: skip it, or use its detected tissue (said per slide)",
    )
    if labels:
        group.add_argument(
            "--roi-labels",
            action="store_true",
            help="each tissue's label is the classification of the regions it lies in (one of --classes); "
            "labels.csv then gives only patients and splits",
        )


def roi_options(args: argparse.Namespace) -> object:
    from hpcdistill.slides.regions import RoiOptions

    if args.rois is not None and not Path(args.rois).exists():
        from hpcdistill.common.errors import CommandError

        raise CommandError(f"--rois {args.rois}: no such file or folder")
    return RoiOptions(args.rois, args.roi_mode, args.roi_missing, getattr(args, "roi_labels", False))


def add_mag_scale_flags(parser: argparse.ArgumentParser, model_decides: bool) -> None:
    """What a magnification means (slides.mag_scale), the same in `shard` and `predict`; with `model_decides`, the
    default is what the model's shards used."""
    from hpcdistill.slides.mag_scale import MAG_BASES, MPP_AT_10X

    group = parser.add_argument_group("magnification")
    group.add_argument("--base-mag", type=float, help="override the base magnification read from metadata")
    group.add_argument(
        "--mag-from",
        choices=MAG_BASES,
        default=None if model_decides else "mpp",
        help="a slide's magnification from its pixel size (10x = --mpp-at-10x um/px: every scanner cut at one "
        "physical scale) or from its objective power (how folders were cut before this option)"
        + (" (default: what the model's shards used)" if model_decides else " (default: mpp)"),
    )
    group.add_argument(
        "--mpp-at-10x",
        type=float,
        default=None if model_decides else MPP_AT_10X,
        help=f"microns per pixel at 10x for --mag-from mpp (default {MPP_AT_10X:g}"
        + (", or the model's)" if model_decides else ")"),
    )


def mag_scale(args: argparse.Namespace) -> object:
    """The MagScale `shard`'s flags give."""
    from hpcdistill.slides.mag_scale import MagScale

    return MagScale(args.mag_from, args.mpp_at_10x)


def add_stain_flags(parser: argparse.ArgumentParser, model_decides: bool) -> None:
    """Stain normalisation (slides.stain), the same in `shard` and `predict`; in `predict` the model's shards decide
    and the flag only states what the user expects (refused when the model's differs)."""
    from hpcdistill.slides.stain import STAIN_METHODS

    group = parser.add_argument_group("stain")
    group.add_argument(
        "--stain-norm",
        choices=STAIN_METHODS,
        default=None if model_decides else "none",
        help="map every slide's stain to a reference (fitted per slide on its tissue): Macenko's stain vectors or "
        "Reinhard's L*a*b* statistics"
        + (" (default: what the model's shards used; another is refused)" if model_decides else " (default: none)"),
    )
    if not model_decides:
        group.add_argument(
            "--stain-reference",
            help="an image (a tile) of the stain to map to; default: Macenko's published reference (reinhard needs "
            "one)",
        )


def stain_norm(args: argparse.Namespace) -> object:
    """The StainNorm `shard`'s flags give, its reference fitted."""
    from hpcdistill.slides.stain import StainNorm

    return StainNorm.fitted(args.stain_norm, args.stain_reference)
