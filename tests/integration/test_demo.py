"""The shortened demo, end to end through the real CLI: every artefact of the pipeline exists and is consistent."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colors
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def demo_section():
    """docs/demo_section.py, the README tooling (not part of the package)."""
    spec = importlib.util.spec_from_file_location("demo_section", REPO / "docs" / "demo_section.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(900)
def check_readme_section(out: Path, exp: Path, report: str, tmp_path: Path) -> None:
    """The README's demo section is rendered from the run's record and evaluation records, tables as in the report."""
    update_readme = demo_section().update_readme

    record = json.loads((out / "demo.json").read_text())
    assert record["versions"]["torch"] and record["machine"]["cores"] and set(record["phase_minutes"]) >= {"Teacher"}
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo:start -->\nstale text\n<!-- demo:end -->\noutro\n")
    (tmp_path / "docs").mkdir()
    text = update_readme(out, readme).read_text()
    assert (
        text.startswith("intro\n<!-- demo:start -->\nResults of one `make demo` run at commit ") and "stale" not in text
    )
    teacher_table = report.split("## Teacher (Table 3 layout)\n\n")[1].split("\n\n")[0]
    assert teacher_table in text and text.endswith("<!-- demo:end -->\noutro\n")
    assert (tmp_path / "docs" / "demo-figure3.png").read_bytes() == (exp / "report" / "figure3.png").read_bytes()


def test_quick_demo_produces_every_artefact(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "hpcdistill.cli.main", "demo", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "synthetic" / "shards" / "manifest.json").read_text())
    assert manifest["mags"] == [10.0, 2.5, 1.25]
    assert {"train", "val", "test", "aux1", "aux2"} <= set(manifest["splits"])
    exp = out / "experiment"
    runs = ["teacher"] + [f"{m}-{mag}x" for m in ("baseline", "kd", "kd_adv1", "kd_adv2") for mag in ("2.5", "1.25")]
    for run in runs:
        run_dir = exp / run
        assert (run_dir / "best.pt").is_file(), run
        assert list((run_dir / "tb").glob("events.out.tfevents.*")), run
        record = json.loads((run_dir / "eval" / "test.json").read_text())
        assert record["samples"] == manifest["splits"]["test"]["samples"]
        assert record["bootstrap"]["iterations"] == 200
    flops = {run: json.loads((exp / run / "eval" / "test.json").read_text())["gflops"]["fixed"] for run in runs}
    assert flops["teacher"] > flops["kd-2.5x"] > flops["kd-1.25x"]  # students cheaper, 1.25x cheapest
    report = (exp / "report" / "report.md").read_text()
    needles = ["Table 3 layout", "Table 4 layout", "mag = 2.5x", "mag = 1.25x", "KD (ADv1)", "KD (ADv2)"]
    needles += ["paper's ordering", "## Slide level (Table 4 layout, AUROC included)", "## Patient level"]
    needles += ["Paired differences at the slide level", "| 2.5x | KD − Baseline |"]
    assert all(needle in report for needle in needles), [n for n in needles if n not in report]
    with Image.open(exp / "report" / "figure3.png") as img:  # five series in matplotlib's first five colours
        pixels = np.asarray(img.convert("RGB"))
    for series in range(5):
        rgb = np.array([round(255 * c) for c in colors.to_rgb(f"C{series}")], np.uint8)
        assert (pixels == rgb).all(axis=-1).sum() > 20, series
    launch = json.loads((exp / "launch.json").read_text())
    assert [j["kind"] for j in launch["jobs"]][0] == "teacher" and len(launch["jobs"]) == 6
    assert "slide level (tissue level) accuracy, slide-level AUROC:" in proc.stdout  # slides beside tissues
    assert "  Teacher @ 10x: " in proc.stdout and ", AUROC " in proc.stdout
    assert "tensorboard --logdir" in proc.stdout and str(exp / "report" / "report.md") in proc.stdout
    assert "time per phase (jobs run side by side where the cores allow): slides and shards " in proc.stdout
    check_readme_section(out, exp, report, tmp_path)
    check_numerics_digest(exp)  # last: it skips where the digest is not comparable


def check_numerics_digest(exp: Path) -> None:
    """The README's demo block is only current while the quick demo computes what it computed when the block was
    written (make readme-demo stores the digest of its probabilities): changed numerics fail here."""
    section = demo_section()
    mark = section.DIGEST_MARK.search((REPO / "README.md").read_text())
    assert mark, "README.md lacks its <!-- quick-demo-digest: ... --> line: run make readme-demo"
    here = section.digest_host()
    if any(mark[k] != here[k] for k in ("cpu", "isa", "torch")):
        pytest.skip(f"the digest was made on {mark['cpu']} (isa {mark['isa']}) with torch {mark['torch']}: not here")
    quick_digest = section.quick_digest
    assert quick_digest(exp) == mark["digest"], (
        "the demo's numerics changed since the README's block was written: run `make demo && make readme-demo`"
    )


def test_demo_seeds_repeat_every_run_of_the_demo_experiment(tmp_path):
    """`hpcdistill demo --seeds 3` launches configs/experiments/demo.yaml with every run repeated per seed."""
    from hpcdistill.experiment.demo import QUICK, demo_experiment, write_experiment
    from hpcdistill.experiment.experiment_file import load_experiment
    from hpcdistill.experiment.graph import plan_jobs

    path = write_experiment(tmp_path, tmp_path / "shards", QUICK, demo_experiment(), seeds=3)
    exp = load_experiment(path)
    assert exp.seeds == [0, 1, 2]
    jobs = {j.key: j for j in plan_jobs(exp)}
    assert [t.name for t in jobs["teacher"].tasks] == ["teacher-s0", "teacher-s1", "teacher-s2"]
    assert len(jobs["kd_adv1"].tasks) == 2 * 3 and jobs["kd_adv1"].tasks[-1].name == "kd_adv1-1.25x-s2"
    assert "run.seed=2" in jobs["kd_adv1"].tasks[-1].overrides
    (tmp_path / "one").mkdir()
    single = load_experiment(write_experiment(tmp_path / "one", tmp_path / "shards", QUICK, demo_experiment()))
    assert single.seeds == [] and [t.name for t in plan_jobs(single)[0].tasks] == ["teacher"]
