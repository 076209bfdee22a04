"""The `hpcdistill` command: argparse subcommands, each a thin call into one module.

To add a subcommand, write `add_<name>(subparsers)` that builds its parser with `parsing.command(subparsers,
"<name>", run_<name>)`, and list it in SUBCOMMANDS. Runners take the parsed namespace and return an exit code;
HpcdistillError becomes one stderr line.
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Callable, Sequence

from hpcdistill import __version__
from hpcdistill.cli.flag_ranges import bound_flags
from hpcdistill.cli.predict_command import add_predict
from hpcdistill.cli.run_commands import add_demo, add_evaluate, add_flops, add_launch, add_report, add_status, add_train
from hpcdistill.cli.shard_commands import add_shard, add_synth
from hpcdistill.common.console import say
from hpcdistill.common.errors import HpcdistillError, one_line
from hpcdistill.common.limits import available_cores
from hpcdistill.common.provenance import record_command
from hpcdistill.common.signals import Interrupted, check_interrupted, interruptible

PROG = "hpcdistill"

# ---------------------------------------------------------------------------------------------------------- main

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_synth,
    add_shard,
    add_train,
    add_evaluate,
    add_report,
    add_predict,
    add_flops,
    add_launch,
    add_status,
    add_demo,
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to show (required options, flags
    that are off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or action.required or "default" in (action.help or ""):
            return action.help  # nothing to show, or the help states its default itself (e.g. a list as typed)
        return super()._get_help_string(action)


class OneLineErrors(argparse.ArgumentParser):
    """A usage error is one line naming the flag and the reason, exit 2, like every other error (`--help` shows the
    usage). Flags are matched whole: argparse's prefix matching would take `shard --mag 10` as `--mags 10`, and a
    flag added later would silently change what an old abbreviation means."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class SubcommandParser(OneLineErrors):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog=PROG, description="Resolution-based distillation for histology.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=SubcommandParser)
    for add in SUBCOMMANDS:
        add(subparsers)
    bound_flags(parser)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse ends a `nargs="*"` positional at the first flag: `train c.yaml --overwrite data.mag=1.25` would
    leave `data.mag=1.25` unrecognized. key=value words after a command's flags join its overrides; anything else
    unrecognized is the usual one-line error."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list):
        overrides = [word for word in extra if "=" in word and not word.startswith("-")]
        args.overrides += overrides
        extra = [word for word in extra if word not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def cap_workers(args: argparse.Namespace) -> None:
    """--workers past the cores this process may use (its SLURM allocation or cgroup) only slows it down: capped,
    with a line. An array's --workers sizes each task on its node, so it is left as given."""
    cores = available_cores()
    if getattr(args, "workers", 0) > cores and not getattr(args, "cluster", None):
        say(f"--workers {args.workers}: this process may use {cores} core(s); using {cores}")
        args.workers = cores


def reference_markdown() -> str:
    """The README's CLI reference: each subcommand's one-line help and usage, at a fixed 100-column width.

    tests/integration/test_readme.py checks docs/cli.md holds exactly this text, so the reference cannot drift from
    --help.
    Regenerate with: python -c "from hpcdistill.cli.main import reference_markdown; print(reference_markdown())"
    """
    import os

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps usage to the terminal width
    try:
        parser = build_parser()
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        blocks = [
            f"#### `{PROG} {name}`: {helps[name]}\n\n```\n{sub.format_usage().strip()}\n```"
            for name, sub in action.choices.items()
        ]
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n\n".join(blocks)


def main(argv: Sequence[str] | None = None) -> int:
    record_command([PROG, *(sys.argv[1:] if argv is None else argv)])  # what every provenance record names
    try:
        return _run(parse_command_line(build_parser(), argv))
    finally:
        record_command([])  # this command is over: a later call through the Python API is not it


def _run(args: argparse.Namespace) -> int:
    cap_workers(args)
    try:
        with interruptible():
            code = int(args.func(args) or 0)
            check_interrupted()  # a signal only recorded (it landed in a library callback) still ends in its line
            return code
    except HpcdistillError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output that cannot be written (read-only, a file in the way, a full disk)
        print(f"{PROG}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        name, code = (exc.name, exc.exit_code) if isinstance(exc, Interrupted) else ("SIGINT", 130)
        print(f"{PROG}: interrupted by {name}: stopped; rerun the same command to resume", file=sys.stderr)
        return code


def os_error_line(exc: OSError) -> str:
    """'<path>: <reason>; completed outputs are kept' from an OSError that reached the top."""
    path = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p)
    reason = exc.strerror or one_line(exc)
    return f"{path or 'output'}: {reason}; nothing complete was lost: fix it and rerun the same command"


if __name__ == "__main__":
    sys.exit(main())
