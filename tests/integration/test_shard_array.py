"""Sharding as an array of tasks: through the real CLI on real synthetic slides (mixed sizes, one corrupt file), as
local processes and on the real local SLURM, against a single-process run of the same slides."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import sacct_runs, sacct_wait_final

from hpcdistill.cli import main
from hpcdistill.cluster.task_array import balance

REPO = Path(__file__).resolve().parents[2]
SHARD = ["--mags", "10,2.5", "--shard-max-samples", "2", "--no-progress"]


@pytest.fixture(scope="module")
def mixed_slides(tmp_path_factory) -> dict:
    """10 real slides of three sizes (SVS and TIFF, labeled train/val/test and one aux) and one corrupt file,
    and a single-process run of them: what every array run must reproduce."""
    from hpcdistill.shards.sharding import ShardParams, run_sharding
    from hpcdistill.synthetic.dataset import write_dataset, write_slide
    from hpcdistill.synthetic.specs import DatasetSpec, SlideSpec

    root = tmp_path_factory.mktemp("mixed")
    slides, labels = write_dataset(
        root / "slides",
        DatasetSpec(slides_per_split={"train": 3, "val": 2, "test": 2}, aux1=1, aux2=0, size=(768, 576), seed=3),
    )
    write_slide(
        root / "slides" / "big_a.svs", SlideSpec(1536, 1152, fmt="svs", base_mag=40, class_id=0, seed=21, tissues=3)
    )
    write_slide(
        root / "slides" / "big_b.tiff", SlideSpec(1280, 960, fmt="tiff", base_mag=40, class_id=1, seed=22, tissues=2)
    )
    (root / "slides" / "broken.svs").write_bytes(b"II*\x00" + os.urandom(2000))  # a TIFF header, then garbage
    with open(labels, "a") as fh:
        fh.write("big_a.svs,PBA,normal,train\nbig_b.tiff,PBB,duodenitis,test\nbroken.svs,PBR,celiac,val\n")
    params = ShardParams(mags=(10.0, 2.5), shard_max_samples=2)
    run_sharding([root / "slides"], root / "single", labels_csv=str(labels), params=params, progress=False)
    return {"root": root, "slides": root / "slides", "labels": labels, "single": root / "single"}


def samples(folder: Path) -> dict[str, dict[str, str]]:
    """{key: {payload: sha256}} over every tar in the folder; a key twice is an error."""
    found: dict[str, dict[str, str]] = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                assert ext not in found.setdefault(key, {}), f"{key}.{ext} twice ({path.name})"
                found[key][ext] = hashlib.sha256(tar.extractfile(member).read()).hexdigest()
    return found


def without_shard_names(manifest: dict) -> dict:
    """The manifest but for which tar holds which sample: names and boundaries may differ between runs."""
    manifest = json.loads(json.dumps(manifest))
    for split in manifest["splits"].values():
        split.pop("shards")
    manifest["params"].pop("shard_max_samples")
    manifest.pop("files")  # each tar's size and count, under its name: the same samples in other tars
    manifest.pop("provenance")  # the command line, host and time that made each
    manifest.pop("name")  # each folder's own name
    return manifest


def assert_same_as_single(out: Path, single: Path) -> None:
    merged = json.loads((out / "manifest.json").read_text())
    assert without_shard_names(merged) == without_shard_names(json.loads((single / "manifest.json").read_text()))
    assert samples(out) == samples(single)  # every key once, the same bytes for each
    listed = sorted(name for split in merged["splits"].values() for name in split["shards"])
    assert listed == sorted(p.name for p in out.glob("*.tar")) and all("-t0" in name for name in listed)


def shard_cli(data: dict, out: Path, *extra: str) -> list[str]:
    return ["shard", str(data["slides"]), "--labels", str(data["labels"]), "--out", str(out), *SHARD, *extra]


def test_balance_is_deterministic_and_heaviest_first():
    weights = [5.0, 1.0, 4.0, 3.0, 3.0, 2.0, 9.0]
    assignment = balance(weights, 3)
    assert assignment == balance(weights, 3) and sorted(i for task in assignment for i in task) == list(range(7))
    loads = sorted(sum(weights[i] for i in task) for task in assignment)
    assert loads == [9.0, 9.0, 9.0]  # 9 | 5+4 | 3+3+2+1: round-robin on names would give 10, 9, 8


def test_three_local_tasks_equal_the_single_process_run(mixed_slides, tmp_path, capsys):
    out = tmp_path / "array"
    assert main.main(shard_cli(mixed_slides, out, "--cluster", "local", "--tasks", "3")) == 0
    printed = capsys.readouterr().out
    assert_same_as_single(out, mixed_slides["single"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["slides"]["broken"]["status"] == "skipped" and "broken.svs" in manifest["slides"]["broken"]["reason"]
    )
    assert printed.count("skipped: ") == 1 and "broken.svs" in printed  # reported once, with its reason
    record = json.loads((out / "launch.json").read_text())
    assert [j["key"] for j in record["jobs"]] == ["shard", "merge"] and len(record["jobs"][0]["tasks"]) == 3
    parts = [json.loads((out / "tasks" / f"t00{i}" / "part.json").read_text()) for i in range(3)]
    per_task = [set(p["params"]["task_slides"]) for p in parts]
    assert set.union(*per_task) == set(manifest["slides"]) and sum(map(len, per_task)) == len(manifest["slides"])
    assert main.main(shard_cli(mixed_slides, out, "--cluster", "local", "--tasks", "3")) == 0  # complete: nothing
    assert "already complete" in capsys.readouterr().err


def test_a_failed_task_is_the_only_one_rerun(mixed_slides, tmp_path, capsys):
    """Task t002 cannot write (a folder sits where its shard goes): the run fails naming it, the other tasks'
    work stays, and the rerun runs t002 alone, then the merge."""
    out = tmp_path / "array"
    out.mkdir()
    for split in ("train", "val", "test", "aux1"):
        (out / f".{split}-t002-000000.tar.tmp").mkdir()
    serial = ["--cluster", "local", "--tasks", "3", "--cpus-per-task", str(os.cpu_count())]  # one task at a time
    assert main.main(shard_cli(mixed_slides, out, *serial)) == 2
    assert "shard: job" in capsys.readouterr().err and not (out / "manifest.json").exists()
    assert (out / "tasks" / "t000" / "part.json").is_file() and (out / "tasks" / "t001" / "part.json").is_file()
    for blocker in out.glob(".*.tar.tmp"):
        blocker.rmdir()
    assert main.main(shard_cli(mixed_slides, out, *serial)) == 0
    record = json.loads((out / "launch.json").read_text())
    assert [(j["key"], [t["name"] for t in j["tasks"]]) for j in record["jobs"]] == [
        ("shard", ["shard-t002"]),
        ("merge", ["merge"]),
    ]
    assert_same_as_single(out, mixed_slides["single"])


def test_array_runs_refuse_folders_of_other_runs(mixed_slides, tmp_path, capsys):
    out = tmp_path / "array"
    assert main.main(shard_cli(mixed_slides, out, "--cluster", "local", "--tasks", "2")) == 0
    (out / "manifest.json").unlink()  # as if the merge had not run yet
    capsys.readouterr()
    assert main.main(shard_cli(mixed_slides, out, "--cluster", "local", "--tasks", "3")) == 2
    assert "another --tasks" in capsys.readouterr().err
    assert main.main(shard_cli(mixed_slides, out)) == 2  # a single-process run into an unmerged array's folder
    assert "unfinished array of tasks" in capsys.readouterr().err
    assert main.main(shard_cli(mixed_slides, tmp_path / "x", "--cluster", "local", "--tasks", "99")) == 2
    assert "--tasks 99: must be between 1 and the number of slides (11)" in capsys.readouterr().err


def test_dry_run_prints_the_assignment_and_the_sbatch_script(mixed_slides, tmp_path, capsys):
    out = tmp_path / "array"
    assert main.main(shard_cli(mixed_slides, out, "--dry-run")) == 0  # the plan: tissue area per slide
    assert (
        main.main(shard_cli(mixed_slides, out, "--cluster", "slurm", "--tasks", "3", "--dry-run", "--partition", "cpu"))
        == 0
    )
    printed = capsys.readouterr().out
    assert "3 tasks over 11 slides, balanced by level-0 tissue area (plan.json)" in printed
    table = [line.split() for line in printed.splitlines() if line.startswith("t00")]
    assert [row[0] for row in table] == ["t000", "t001", "t002"] and sum(int(row[1]) for row in table) == 11
    assert "#SBATCH --array=0-2" in printed and "#SBATCH --partition=cpu" in printed
    assert "merge" in printed and not (out / "tasks").exists() and not list(out.glob("*.tar"))


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_slurm_task_requeued_mid_slide_resumes_from_its_journal(slurm_cluster, mixed_slides, tmp_path):
    """`scontrol requeue` kills a running array task and queues it again (as a preemption does) once its first
    shard is complete; the rerun resumes from the task's journal, and the merged result is the single run's."""
    out = tmp_path / "array"
    argv = [
        sys.executable,
        "-m",
        "hpcdistill.cli.main",
        *shard_cli(
            mixed_slides,
            out,
            "--cluster",
            "slurm",
            "--tasks",
            "2",
            "--wait",
            "--timeout-min",
            "10",
            "--mem-gb",
            "1",
            "--shard-max-samples",
            "1",
        ),
    ]  # 1st shard: 1st sample
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(subprocess.run, argv, cwd=REPO, capture_output=True, text=True, timeout=360)
        journal = out / "tasks" / "t000" / ".progress.json"
        deadline, task_id = time.monotonic() + 120, None
        while time.monotonic() < deadline and not done.done():
            try:  # the task's first shard is journalled, and the launcher has recorded its job id
                first_shard = bool(json.loads(journal.read_text())["shards"])
                task_id = json.loads((out / "launch.json").read_text())["jobs"][0]["tasks"][0]["job_id"]
            except (OSError, ValueError, IndexError):
                first_shard = False
            if first_shard and task_id:
                break
            time.sleep(0.05)
        assert not done.done() and task_id, done.result().stderr[-2000:] if done.done() else "no first shard"
        subprocess.run(["scontrol", "requeue", task_id], check=True, capture_output=True, timeout=30)
        finished = done.result()
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert [state for state, _ in sacct_wait_final(task_id, 60)][-1] == "COMPLETED"
    assert len(sacct_runs(task_id)) >= 2  # it really ran again
    assert_same_as_single(out, mixed_slides["single"])


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slurm_experiment_with_a_shard_stage_runs_end_to_end(slurm_cluster, mixed_slides, tmp_path):
    """One launch: shard array -> merge -> teacher and a baseline -> evaluation and report, on the local SLURM."""
    import yaml

    from hpcdistill.experiment.launch import launch_experiment

    cpu = {
        "nodes": 1,
        "gpus_per_node": 0,
        "tasks_per_node": 1,
        "cpus_per_task": 1,
        "mem_gb": 2,
        "timeout_min": 20,
        "signal_delay_s": 30,
        "max_requeue": 1,
    }
    tiny = [
        "model.arch=resnet10",
        "model.width=8",
        "model.groups=4",
        "train.epochs=1",
        "data.epoch_samples=4",
        "train.grad_accum=1",
        "log.progress=false",
        "data.num_workers=0",
    ]
    exp = {
        "name": "staged",
        "out_dir": str(tmp_path / "runs"),
        "shards": str(tmp_path / "shards"),
        "mags": [2.5],
        "shard": {"slides": [str(mixed_slides["slides"])], "labels": str(mixed_slides["labels"]), "tasks": 2},
        "teacher": {"config": "configs/demo/teacher.yaml", "overrides": tiny},
        "methods": {"baseline": {"config": "configs/demo/baseline.yaml", "label": "Baseline", "overrides": tiny}},
        "evaluate": {"split": "test", "iterations": 50},
        "resources": {"default": cpu},
    }
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(exp))
    dry = launch_experiment(path, cluster="slurm", dry_run=True)
    assert dry["graph"]["merge"]["after_ok"] == ["shard"] and "merge" in dry["graph"]["teacher"]["after_ok"]
    record = launch_experiment(path, cluster="slurm", wait=True, wait_timeout_s=540)
    assert [j["key"] for j in record["jobs"]] == ["shard", "merge", "teacher", "baseline", "evaluate"]
    assert all(t["state"] == "COMPLETED" for j in record["jobs"] for t in j["tasks"])
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["mags"] == [10.0, 2.5] and manifest["slides"]["broken"]["status"] == "skipped"
    assert (tmp_path / "runs" / "staged" / "report" / "report.md").is_file()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_slurm_array_spreads_over_two_nodes_and_equals_the_single_run(slurm_cluster, mixed_slides, tmp_path):
    """On the 2-node cluster (CI's): four array tasks land on both nodes, and the merged shards are the single
    process's, bytes and rows."""
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=20).stdout.split()
    if len(set(nodes)) < 2:
        pytest.skip(f"the local SLURM has one node ({nodes}): `slurm/cluster.sh start --nodes 2`")
    out = tmp_path / "array"
    argv = shard_cli(mixed_slides, out, "--cluster", "slurm", "--tasks", "4", "--wait", "--mem-gb", "1")
    done = subprocess.run(
        [sys.executable, "-m", "hpcdistill.cli.main", *argv], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_as_single(out, mixed_slides["single"])
    array = json.loads((out / "launch.json").read_text())["jobs"][0]["slurm_id"]
    used = task_nodes(array, 4)
    assert len(used) == 4 and set(used.values()) == {"node1", "node2"}, used


def task_nodes(array: str, tasks: int, timeout_s: float = 90.0) -> dict[str, str]:
    """{array task: the node it ran on}, once accounting holds every task: slurmdbd stores a finished task's record
    a moment after the job ends, so a query right after the wait can miss some (seen once in CI: one row)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", str(array), "-o", "JobID,NodeList"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        nodes = dict(row.split("|", 1) for row in rows if "|" in row and row.split("|", 1)[1].startswith("node"))
        if len(nodes) >= tasks or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)
