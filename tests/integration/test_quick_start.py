"""The README's quick start, run as written from an empty folder: every command succeeds and leaves what the README
says it leaves, ending in a predicted heat map."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"

pytestmark = pytest.mark.slow


def quick_start_commands() -> list[str]:
    block = re.search(
        r"<!-- quickstart:start -->\n```bash\n(.*?)```\n<!-- quickstart:end -->", README.read_text(), re.S
    )
    assert block, "README lacks its quick start block"
    return [line for line in block.group(1).splitlines() if line.startswith("hpcdistill ")]


@pytest.mark.timeout(900)
def test_the_quick_start_runs_as_written_to_a_heat_map(tmp_path):
    commands = quick_start_commands()
    assert [shlex.split(c)[1] for c in commands] == [
        "synth", "shard", "train", "train", "evaluate", "evaluate", "report", "predict"
    ]  # fmt: skip
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    env.update(DS_ACCELERATOR="cpu")
    for command in commands:
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "shards" / "manifest.json").is_file() and list((tmp_path / "shards" / "qc").glob("*.png"))
    records = {}
    for run in ("teacher-10x", "distill-2.5x"):
        assert (tmp_path / "runs" / run / "best.pt").is_file()
        records[run] = json.loads((tmp_path / "runs" / run / "eval" / "test.json").read_text())
    # the distillation ran under the default gate (no teacher.gate=warn), so the teacher passed it; the student
    # learned: its test balanced accuracy is well above chance (1/3), and it does not call one class
    assert "teacher.gate" not in " ".join(commands)
    student = records["distill-2.5x"]["metrics"]
    assert student["balanced_accuracy"][0] >= 0.6, student
    assert not records["distill-2.5x"]["units"]["tissue"]["collapse"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "figure3.png").is_file()
    teacher_table = report.split("## Teacher (Table 3 layout)")[1].split("##")[0]
    assert [line.split("|")[1].strip() for line in teacher_table.splitlines() if line.startswith("| ")][1:4] == [
        "Balanced accuracy", "Top-1 accuracy", "OvR accuracy (paper)"
    ]  # fmt: skip
    predictions = json.loads((tmp_path / "predictions" / "predictions.json").read_text())
    slides = [s for s in predictions["slides"] if s["status"] == "ok"]
    written = (tmp_path / "slides" / "labels.csv").read_text().splitlines()[1:]  # every slide synth wrote
    assert len(slides) == len(written) >= 42 and all(Path(s["heatmap"]).is_file() for s in slides)
    assert not predictions["notes"]  # no collapsed calls
    assert list((tmp_path / "predictions" / "geojson").glob("*.geojson"))
