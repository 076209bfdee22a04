"""The `hpcdistill` console script end to end, as a user runs it: synth, then shard."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from hpcdistill.cli import main

HPCDISTILL = str(Path(sys.executable).parent / "hpcdistill")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HPCDISTILL, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    result = run(
        "synth",
        "--out",
        str(out),
        "--slides-per-split",
        "train=3,val=1,test=1",
        "--aux1",
        "1",
        "--aux2",
        "1",
        "--classes",
        "2",
        "--size",
        "2048x1536",
        "--tissues",
        "1,2",
        "--seed",
        "3",
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_synth_then_shard_end_to_end(synth, tmp_path):
    rows = list(csv.DictReader(open(synth / "labels.csv")))
    assert len(rows) == 7 and {r["split"] for r in rows} == {"train", "val", "test", "aux1", "aux2"}
    out = tmp_path / "shards"
    result = run(
        "shard",
        str(synth),
        "--labels",
        str(synth / "labels.csv"),
        "--out",
        str(out),
        "--workers",
        "2",
        "--shard-size",
        "64KB",
        "--mags",
        "10,2.5,0.625",
        "--tissue-close-radius",
        "3",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "val", "test", "aux1", "aux2"}
    assert manifest["mags"] == [10.0, 2.5, 0.625] and manifest["params"]["tissue"]["close_radius"] == 3
    assert all(s["status"] == "ok" for s in manifest["slides"].values())
    assert {s["base_mag"] for s in manifest["slides"].values()} == {20.0, 40.0}  # synth mixes 20x and 40x scans
    assert "train:" in result.stdout and "7 slides ok, 0 skipped" in result.stdout
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            with tarfile.open(out / shard) as tar:
                names = tar.getnames()
            assert shard.startswith(f"{split}-") and names
            allowed = {"10x.jpg", "2.5x.jpg", "0.625x.jpg", "cls", "json"}
            assert all(
                re.fullmatch(r"[A-Za-z0-9_-]+", n.split(".", 1)[0]) and n.split(".", 1)[1] in allowed for n in names
            )
            assert any(n.endswith(".0.625x.jpg") for n in names)
            assert any(n.endswith(".cls") for n in names) == (not split.startswith("aux"))


def test_patient_level_split_without_split_column(synth, tmp_path):
    rows = list(csv.DictReader(open(synth / "labels.csv")))
    labels = tmp_path / "nosplit.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "patient", "label"])
        writer.writerows([r["slide"], r["patient"], r["label"]] for r in rows)
    out = tmp_path / "shards"
    code = main.main(
        [
            "shard",
            str(synth),
            "--labels",
            str(labels),
            "--out",
            str(out),
            "--mags",
            "10,1.25",
            "--split-ratios",
            "0.5,0.25,0.25",
            "--seed",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    slides = json.loads((out / "manifest.json").read_text())["slides"]
    by_patient: dict[str, set] = {}
    for entry in slides.values():
        by_patient.setdefault(entry["patient"], set()).add(entry["split"])
        assert (entry["split"] == "aux") == (entry["label"] is None)
    assert all(len(splits) == 1 for splits in by_patient.values())
    assert "train" in {s["split"] for s in slides.values()}


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    result = run("shard", str(tmp_path / "missing.svs"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"hpcdistill: error: {tmp_path / 'missing.svs'}: no such file or directory"
    bad_size = run("shard", str(tmp_path), "--out", str(tmp_path / "o"), "--shard-size", "huge")
    assert bad_size.returncode == 2 and bad_size.stderr.count("\n") == 1 and "'huge'" in bad_size.stderr
    assert "Traceback" not in result.stderr + bad_size.stderr


def test_help_lists_subcommands_and_tissue_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main.main(["shard", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--tissue-channel", "--tissue-close-radius", "--max-size", "--strict"))
    parser = main.build_parser()
    assert {"shard", "synth"} <= set(parser._subparsers._group_actions[0].choices)


def test_every_subcommand_and_option_is_described_with_its_default():
    import argparse

    parser = main.build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(subcommands) == len(main.SUBCOMMANDS)
    for name, sub in subcommands.items():
        assert sub.description, f"{name}: no description"
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where}: no help text"
            if action.option_strings and action.default not in (None, False) and not action.required:
                assert "default" in formatter._get_help_string(action), f"{where}: default not shown"
