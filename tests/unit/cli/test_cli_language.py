"""One CLI language: every subcommand's parser is walked, and a flag that several commands share means the same in
each (--dry-run plans and prints only, --cluster offers the same three places, the commands that read or write many
files all take --workers, --overwrite and --no-progress)."""

from __future__ import annotations

import argparse

import pytest

from hpcdistill.cli.main import build_parser

MANY_FILES = {"synth", "shard", "predict", "evaluate"}  # demo resumes into its folder: it has no --overwrite


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_no_parser_takes_an_abbreviated_flag(capsys):
    """`shard --mag 10,2.5` is not `--mags`: every parser matches flags whole, and the typo is one line, exit 2."""
    from hpcdistill.cli import main

    assert all(not p.allow_abbrev for p in [build_parser(), *subcommands().values()])
    with pytest.raises(SystemExit) as exit_info:
        main.main(["shard", "slides", "--out", "shards", "--mag", "10,2.5"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --mag 10,2.5" in capsys.readouterr().err


def test_every_dry_run_plans_and_prints_only():
    having = {name: options(p)["--dry-run"] for name, p in subcommands().items() if "--dry-run" in options(p)}
    assert set(having) == {"shard", "predict", "launch", "train"}
    for name, action in having.items():
        assert action.help.startswith("plan and print only"), (name, action.help)


def test_every_cluster_flag_offers_the_same_places():
    having = {name: options(p)["--cluster"] for name, p in subcommands().items() if "--cluster" in options(p)}
    assert set(having) == {"shard", "predict", "launch", "demo"}
    assert {name: tuple(action.choices) for name, action in having.items()} == {
        name: ("debug", "local", "slurm") for name in having
    }


def test_commands_of_many_files_take_workers_overwrite_and_no_progress_meaning_the_same():
    commands = subcommands()
    helps = {}
    for name in MANY_FILES:
        flags = options(commands[name])
        assert {"--workers", "--overwrite", "--no-progress"} <= set(flags), name
        helps[name] = (flags["--overwrite"].help, flags["--no-progress"].help, flags["--workers"].type)
    assert len(set(helps.values())) == 1, helps


def test_the_old_demo_slurm_flag_still_parses_but_is_not_advertised():
    demo = subcommands()["demo"]
    assert options(demo)["--slurm"].help == argparse.SUPPRESS
    assert demo.parse_args(["--slurm"]).slurm and demo.parse_args([]).cluster == "local"


def test_a_folder_with_a_finished_result_is_refused_without_overwrite(tmp_path):
    """The rule itself (common.output_folder.check_overwrite), as each command applies it before writing."""
    from hpcdistill.common.errors import HpcdistillError
    from hpcdistill.common.folder_lock import LOCK, one_writer
    from hpcdistill.common.output_folder import check_overwrite

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's own file\n")
    with pytest.raises(HpcdistillError, match="holds files no hpcdistill command wrote"):
        check_overwrite(out, ["result.json"], overwrite=False)
    (out / "result.json").write_text("{}")  # a user's own file by our name: never taken for our result
    with pytest.raises(HpcdistillError, match="replaces only an earlier hpcdistill result"):
        check_overwrite(out, ["result.json"], overwrite=True)
    (out / "result.json").unlink()
    (out / LOCK).touch()  # an interrupted run of ours: rerunning goes on
    assert check_overwrite(out, ["result.json"], overwrite=False) == []
    (out / "result.json").write_text("{}")
    with pytest.raises(HpcdistillError, match=r"holds a finished result \(result.json\); pass --overwrite"):
        check_overwrite(out, ["result.json"], overwrite=False)
    assert check_overwrite(out, ["result.json"], overwrite=True) == [out / "result.json"]
    with one_writer(out), pytest.raises(HpcdistillError, match="another hpcdistill is writing here"):
        check_overwrite(out, ["result.json"], overwrite=True)  # refused before anything is removed
    assert (out / "result.json").is_file()
