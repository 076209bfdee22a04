"""Every numeric flag of every subcommand has a range, and 0, -1 and 10^9 each end in exit 0 or a one-line exit 2
within seconds, through the real CLI (inputs that do not exist, so an accepted value ends at the first input)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from hpcdistill.cli import main
from hpcdistill.cli.flag_ranges import Bounded, numeric


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = main.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def base_argv(name: str, tmp: Path) -> list[str]:
    """The subcommand with inputs that do not exist and an --out that cannot be a folder (a file), so a command that
    accepts the value stops at once, in its one line."""
    blocker = tmp / "a-file"
    blocker.write_text("not a folder\n")
    missing = str(tmp / "missing")
    return {
        "synth": ["synth", "--out", str(blocker / "x")],
        "shard": ["shard", missing, "--out", str(blocker / "x")],
        "evaluate": ["evaluate", missing + ".pt", "--out", str(blocker / "x")],
        "predict": ["predict", missing + ".pt", missing, "--out", str(blocker / "x")],
        "flops": ["flops"],
        "demo": ["demo", "--out", str(blocker / "x")],
    }[name]


def numeric_flags() -> list[tuple[str, str]]:
    return [
        (name, action.option_strings[-1])
        for name, parser in subcommands().items()
        for action in parser._actions
        if numeric(action) and action.help != argparse.SUPPRESS
    ]


def test_every_numeric_flag_has_a_range():
    unbounded = [
        f"{name} {action.option_strings[-1]}"
        for name, parser in subcommands().items()
        for action in parser._actions
        if numeric(action) and not isinstance(action.type, Bounded)
    ]
    assert numeric_flags() and not unbounded, unbounded


@pytest.mark.parametrize(("command", "flag"), numeric_flags())
def test_zero_minus_one_and_a_billion_end_in_one_line(command, flag, tmp_path, capsys):
    for value in ("0", "-1", "1000000000"):
        started = time.monotonic()
        try:
            code = main.main([*base_argv(command, tmp_path), f"{flag}={value}"])
        except SystemExit as exc:  # argparse refuses at parse time
            code = exc.code
        elapsed = time.monotonic() - started
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code in (0, 2), (command, flag, value, code, err)
        assert elapsed < 20, (command, flag, value, elapsed)
        errors = [line for line in err if ": error: " in line]
        assert code == 0 or (len(errors) == 1 and errors[0] == err[-1]), (command, flag, value, err)


def test_a_value_out_of_range_names_the_flag_and_its_range(capsys):
    with pytest.raises(SystemExit) as exc:
        main.main(["evaluate", "best.pt", "--iterations", "1000000000"])
    line = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(line.splitlines()) == 1
    assert "argument --iterations: '1000000000': must be in [1, 1e+06]" in line
    with pytest.raises(SystemExit):
        main.main(["evaluate", "best.pt", "--confidence", "1.5"])
    assert "argument --confidence: '1.5': must be in" in capsys.readouterr().err  # the option's current name


def test_workers_past_the_cores_are_capped_with_a_line(tmp_path, capsys):
    code = main.main(
        ["predict", str(tmp_path / "m.pt"), str(tmp_path / "s"), "--out", str(tmp_path / "o")] + ["--workers", "4000"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--workers 4000: this process may use" in err
