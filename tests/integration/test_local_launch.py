"""Experiments launched on this machine (`--cluster local|debug`) on shards cut by the real sharder: the shipped
demo experiment with `status` while it runs, the stages in order, seeds pooled in the report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from launch_helpers import CPU, TINY, tiny_experiment

from hpcdistill.cluster.status import experiment_status, format_status
from hpcdistill.experiment.experiment_file import load_experiment
from hpcdistill.experiment.graph import plan_jobs
from hpcdistill.experiment.launch import launch_experiment

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def poll_status(proc: subprocess.Popen, exp_dir: Path) -> list[dict]:
    """`status` rows seen while the launch runs that were not yet final."""
    seen_running = []
    while proc.poll() is None:
        if (exp_dir / "launch.json").is_file():
            rows = experiment_status(exp_dir)  # during the run, as on SLURM
            seen_running += [r for r in rows if r["state"] not in ("COMPLETED", "FAILED")]
        time.sleep(0.5)
    return seen_running


def test_demo_experiment_file_runs_end_to_end_locally_with_progress_and_status(tiny_dataset, tmp_path):
    """configs/experiments/demo.yaml as shipped, shortened (tiny network, one epoch, one magnification), on the
    sharder's real shards, through `hpcdistill launch --cluster local`; `status` is asked while it runs."""
    exp = yaml.safe_load((REPO / "configs" / "experiments" / "demo.yaml").read_text())
    short = TINY + ["data.epoch_samples=4"]
    exp.update(out_dir=str(tmp_path / "runs"), shards=str(tiny_dataset["shards"]), mags=[2.5])
    for job in [exp["teacher"], *exp["methods"].values()]:
        job["overrides"] = job.get("overrides", []) + short
    exp["evaluate"]["iterations"] = 50
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(exp))
    exp_dir = tmp_path / "runs" / "demo-experiment"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpcdistill.cli.main", "launch", str(path), "--cluster", "local"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen_running = poll_status(proc, exp_dir)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert seen_running, "status never saw a job still running"
    rows = experiment_status(exp_dir)
    assert list(exp["methods"]) == ["baseline", "kd", "kd_adv1", "kd_adv2"]  # the shipped demo experiment
    assert [r["task"] for r in rows] == ["teacher", *(f"{m}-2.5x" for m in exp["methods"]), "evaluate"]
    assert all(r["state"] == "COMPLETED" for r in rows) and (exp_dir / "report" / "report.md").is_file()
    report = (exp_dir / "report" / "report.md").read_text()
    for name, method in exp["methods"].items():
        record = json.loads((exp_dir / f"{name}-2.5x" / "eval" / "test.json").read_text())
        assert record["method"] == method["label"] and method["label"] in report
        assert record["samples"] == tiny_dataset["manifest"]["splits"]["test"]["samples"]
    assert rows[0]["progress"].startswith("done at step ")
    shown = subprocess.run(
        [sys.executable, "-m", "hpcdistill.cli.main", "status", str(exp_dir)], cwd=REPO, capture_output=True, text=True
    )  # the command users type
    assert shown.returncode == 0, shown.stderr
    table = [line.split() for line in shown.stdout.splitlines()[1:]]
    assert [(cells[1], cells[3]) for cells in table] == [(r["task"], "COMPLETED") for r in rows]
    assert "  teacher: teacher  " in stdout and "kd_adv2: kd_adv2-2.5x" in stdout  # progress lines, not a TTY
    assert not list(exp_dir.rglob("%j")), "literal %j folders"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("cluster", ["debug", "local"])
def test_laptop_clusters_run_the_stages_in_order(tmp_path, launch_shards, cluster):
    methods = {"kd": {"config": "configs/demo/distill.yaml", "label": "KD", "overrides": TINY}}
    path = tiny_experiment(tmp_path, launch_shards, "dbg", methods, mags=[2.5], resources={"default": CPU})
    record = launch_experiment(path, cluster=cluster)
    exp_dir = tmp_path / "runs" / "dbg"
    assert [j["key"] for j in record["jobs"]] == ["teacher", "kd", "evaluate"]
    assert record["jobs"][1]["tasks"][0]["result"]["mode"] == "distill"
    assert (exp_dir / "kd-2.5x" / "eval" / "test.json").is_file() and (exp_dir / "report" / "report.md").is_file()
    rows = experiment_status(exp_dir)
    assert [r["state"] for r in rows] == ["COMPLETED"] * 3
    assert "kd-2.5x" in format_status(rows) and json.loads((exp_dir / "launch.json").read_text())["cluster"] == cluster
    if cluster == "debug":  # relaunching a finished experiment retrains nothing: each run returns from its checkpoint
        from hpcdistill.train.run_folder import complete_checkpoints

        run_dir = exp_dir / "kd-2.5x"
        before = (sorted(complete_checkpoints(run_dir / "checkpoints")), (run_dir / "best.pt").read_bytes())
        again = launch_experiment(path, cluster=cluster)
        assert again["jobs"][1]["tasks"][0]["result"] == record["jobs"][1]["tasks"][0]["result"]
        assert (sorted(complete_checkpoints(run_dir / "checkpoints")), (run_dir / "best.pt").read_bytes()) == before


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_seeds_repeat_every_run_and_the_report_pools_them(tiny_dataset, tmp_path):
    """`seeds: [0, 1]` with --cluster local: a teacher, a baseline and a KD run per seed, seed in each run name and
    config; the report gives mean ± sd over seeds and the seed-pooled paired differences."""
    import yaml

    short = [*TINY, "data.epoch_samples=4", "model.arch=resnet10"]
    methods = {
        "baseline": {"config": "configs/demo/baseline.yaml", "label": "Baseline", "overrides": short},
        "kd": {"config": "configs/demo/distill.yaml", "label": "KD", "overrides": short},
    }
    path = tiny_experiment(
        tmp_path,
        tiny_dataset["shards"],
        "seeded",
        methods,
        mags=[2.5],
        seeds=[0, 1],
        teacher={"config": "configs/demo/teacher.yaml", "overrides": short},
        evaluate={"split": "test", "iterations": 100},
        resources={"default": CPU},
    )
    jobs = {j.key: j for j in plan_jobs(load_experiment(path))}
    assert [t.name for t in jobs["kd"].tasks] == ["kd-2.5x-s0", "kd-2.5x-s1"] and jobs["teacher"].is_array
    assert any(o.endswith("teacher-s1/best.pt") for o in jobs["kd"].tasks[1].overrides)
    launch_experiment(path, cluster="local")
    exp_dir = tmp_path / "runs" / "seeded"
    for run in ("teacher-s0", "teacher-s1", "baseline-2.5x-s1", "kd-2.5x-s0"):
        assert yaml.safe_load((exp_dir / run / "config.yaml").read_text())["run"]["seed"] == int(run[-1])
    report = (exp_dir / "report" / "report.md").read_text()
    assert "## Over training seeds" in report and "| 2.5x | Baseline | 2 |" in report and "s0: " in report
    assert "| 2.5x | KD − Baseline | 2 |" in report  # the paired difference pooled over both seeds
