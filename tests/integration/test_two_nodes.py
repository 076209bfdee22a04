"""Two nodes for real: the local SLURM started with `--nodes 2` (slurm/cluster.sh: each slurmd in its own network
and UTS namespace, hostnames node1 and node2), a teacher trained across both (DeepSpeed over gloo), equal to the same
run on one node, a node down at submission, and a shard array spread over both nodes. CI starts the 2-node cluster
(.ci/run sets HPCDISTILL_SLURM_NODES=2); elsewhere these tests skip unless the cluster has two nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import sacct_wait_final
from launch_helpers import CPU, TINY, logged_steps, tiny_experiment
from train_helpers import scalars

from hpcdistill.cluster.status import experiment_status
from hpcdistill.experiment.launch import launch_experiment

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster):
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=20).stdout.split()
    if sorted(set(nodes)) != ["node1", "node2"]:
        if os.environ.get("HPCDISTILL_SLURM_NODES") == "2":
            pytest.fail(f"HPCDISTILL_SLURM_NODES=2 but sinfo shows nodes {nodes}", pytrace=False)
        pytest.skip(f"the local SLURM has nodes {nodes}: start it with `slurm/cluster.sh start --nodes 2`")
    return nodes


def teacher_run(tmp: Path, shards: Path, name: str, nodes: int, tasks: int, *extra: str) -> tuple[dict, Path]:
    """A teacher-only experiment on `nodes` x `tasks` ranks, launched on SLURM and waited for."""
    teacher = {"config": "configs/demo/teacher.yaml", "overrides": [*TINY, "data.epoch_samples=8", *extra]}
    resources = {"default": dict(CPU, nodes=nodes, tasks_per_node=tasks, max_requeue=0)}
    path = tiny_experiment(tmp, shards, name, {}, teacher=teacher, resources=resources)
    return launch_experiment(path, cluster="slurm", wait=True, wait_timeout_s=240), tmp / "runs" / name / "teacher"


@pytest.fixture(scope="module")
def across_and_within(two_nodes, launch_shards, tmp_path_factory):
    """The same teacher on 2 nodes x 1 task and on 1 node x 2 tasks (same seed, same global batch)."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    return teacher_run(tmp, launch_shards, "across", 2, 1), teacher_run(tmp, launch_shards, "within", 1, 2)


@pytest.mark.timeout(600)
def test_a_teacher_trains_on_two_nodes_and_status_names_both(across_and_within):
    (record, run_dir), _ = across_and_within
    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["host"], r["rank"], r["local_rank"], r["world_size"]) for r in ranks] == [
        ("node1", 0, 0, 2),
        ("node2", 1, 0, 2),
    ]
    assert [r["slurm_node"] for r in ranks] == ["node1", "node2"]
    rows = experiment_status(run_dir.parent)
    assert [(r["state"], r["hosts"]) for r in rows][0] == ("COMPLETED", "node1,node2")


@pytest.mark.timeout(600)
def test_two_nodes_by_one_task_equal_one_node_by_two_tasks(across_and_within):
    (_, across), (_, within) = across_and_within
    hosts = {json.loads(p.read_text())["host"] for p in (within / "ranks").glob("rank*.json")}
    assert len(hosts) == 1  # the comparison run really is on one node
    assert logged_steps(across / "tb") == logged_steps(within / "tb")
    assert scalars(across / "tb", "loss/total") == scalars(within / "tb", "loss/total")  # the same loss curve
    a = torch.load(across / "best.pt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(within / "best.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:  # gloo sums the same two gradients in the same order on both layouts: bit for bit
        assert torch.equal(a[key], b[key]), key


@pytest.mark.timeout(300)
def test_a_node_down_at_submission_leaves_the_job_pending_with_its_reason(two_nodes, launch_shards, tmp_path):
    subprocess.run(["scontrol", "update", "nodename=node2", "state=down", "reason=maintenance"], check=True)
    try:
        teacher = {"config": "configs/demo/teacher.yaml", "overrides": list(TINY)}
        resources = {"default": dict(CPU, nodes=2, tasks_per_node=1)}
        path = tiny_experiment(tmp_path, launch_shards, "down", {}, teacher=teacher, resources=resources)
        launch_experiment(path, cluster="slurm", wait=False)
        deadline, state = time.monotonic() + 60, ""
        while time.monotonic() < deadline and not state.startswith("PENDING ("):
            state = experiment_status(tmp_path / "runs" / "down")[0]["state"]
            time.sleep(1)
        assert state.startswith("PENDING (") and ("DOWN" in state or "ReqNodeNotAvail" in state), state
    finally:
        subprocess.run(["scancel", "--name", "down-teacher"], check=False)
        subprocess.run(["scontrol", "update", "nodename=node2", "state=resume"], check=False)


def two_node_teacher_at_a_checkpoint(tmp: Path, shards: Path, name: str, overrides: list[str], requeues: int):
    """A 2-node x 1-task teacher launched on SLURM (not waited for), once it has written a complete checkpoint:
    (experiment file, launch record, job id, run folder)."""
    teacher = {"config": "configs/demo/teacher.yaml", "overrides": [*TINY, *overrides]}
    resources = {"default": dict(CPU, nodes=2, tasks_per_node=1, max_requeue=requeues)}
    path = tiny_experiment(tmp, shards, name, {}, teacher=teacher, resources=resources)
    record = launch_experiment(path, cluster="slurm", wait=False)
    job_id, run_dir = record["jobs"][0]["slurm_id"], tmp / "runs" / name / "teacher"
    deadline = time.monotonic() + 200
    while not list((run_dir / "checkpoints").glob("step*/COMPLETE")):
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.2)
    return path, record, job_id, run_dir


@pytest.mark.timeout(400)
def test_a_killed_rank_on_node2_ends_the_job_naming_it_and_the_relaunch_resumes(two_nodes, launch_shards, tmp_path):
    long = ["train.epochs=200", "train.checkpoint_every_steps=2"]
    path, record, job_id, run_dir = two_node_teacher_at_a_checkpoint(tmp_path, launch_shards, "kill", long, 0)
    rank1 = json.loads((run_dir / "ranks" / "rank1.json").read_text())
    assert rank1["host"] == "node2"
    os.kill(rank1["pid"], signal.SIGKILL)  # one PID space on this machine: the process is node2's
    killed = time.monotonic()
    assert sacct_wait_final(job_id, 90)[-1][0] == "FAILED" and time.monotonic() - killed < 90
    log = Path(record["jobs"][0]["tasks"][0]["stderr"]).read_text()
    assert "node2: task 1: Killed" in log, log[-2000:]  # srun's one line: the node and the rank
    assert not (run_dir / "last.pt").exists()
    again = launch_experiment(path, cluster="slurm", wait=False)  # the same file again: it resumes
    task = again["jobs"][0]["tasks"][0]
    deadline = time.monotonic() + 120
    while "resuming from" not in (Path(task["stdout"]).read_text() if Path(task["stdout"]).is_file() else ""):
        assert time.monotonic() < deadline, "the relaunch did not resume"
        time.sleep(0.5)
    subprocess.run(["scancel", str(again["jobs"][0]["slurm_id"])], check=False)


@pytest.mark.timeout(400)
def test_a_predict_array_over_two_nodes_equals_the_single_process(two_nodes, tiny_dataset, tiny_teacher, tmp_path):
    slides = [str(p) for p in tiny_dataset["slides"]]
    single, array = tmp_path / "single", tmp_path / "array"
    run = [sys.executable, "-m", "hpcdistill", "predict", str(tiny_teacher), *slides, "--no-progress"]
    assert subprocess.run([*run, "--out", str(single)], capture_output=True).returncode == 0
    on_slurm = ["--cluster", "slurm", "--tasks", "4", "--wait", "--mem-gb", "1"]
    done = subprocess.run([*run, "--out", str(array), *on_slurm], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for table in ("slides.csv", "tissues.csv"):
        assert (array / table).read_text() == (single / table).read_text().replace(str(single), str(array)), table
    job = json.loads((array / "launch.json").read_text())["jobs"][0]["slurm_id"]
    used = subprocess.run(
        ["sacct", "-n", "-X", "-j", str(job), "-o", "NodeList%20"], capture_output=True, text=True, timeout=30
    ).stdout.split()
    assert set(used) == {"node1", "node2"}, used


@pytest.mark.timeout(600)
def test_a_requeued_two_node_job_resumes_and_ends_equal_to_an_uninterrupted_run(two_nodes, launch_shards, tmp_path):
    longer = ("train.epochs=20", "train.checkpoint_every_steps=2")
    _, whole = teacher_run(tmp_path, launch_shards, "whole", 2, 1, *longer)
    overrides = ["data.epoch_samples=8", *longer]
    _, record, job_id, run_dir = two_node_teacher_at_a_checkpoint(tmp_path, launch_shards, "requeued", overrides, 2)
    subprocess.run(["scontrol", "requeue", str(job_id)], check=True, capture_output=True, timeout=30)
    states = [state for state, _ in sacct_wait_final(job_id, 300)]
    assert states[-1] == "COMPLETED" and len(states) >= 2, states  # it really ran twice
    log = Path(record["jobs"][0]["tasks"][0]["stdout"]).read_text()
    assert "resuming from" in log, log[-2000:]
    for name in ("best.pt", "last.pt"):
        a = torch.load(whole / name, map_location="cpu", weights_only=True)["state_dict"]
        b = torch.load(run_dir / name, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
