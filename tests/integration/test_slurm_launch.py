"""Experiments on the real local SLURM (slurm/cluster.sh): end to end, two ranks, a time-limit requeue with
resume, a preemption, a training rank killed, a crash."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import SLURM_FINAL_STATES, sacct_wait_final
from launch_helpers import CPU, TINY, check_resumed_runs, final_history, tiny_experiment

from hpcdistill.cluster.status import experiment_status
from hpcdistill.common.errors import LaunchError
from hpcdistill.data.streams import per_rank_samples
from hpcdistill.experiment.launch import launch_experiment

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slurm_experiment(slurm_cluster, launch_shards, tmp_path_factory):
    """Teacher on 2 ranks -> a KD array over 2 magnifications -> evaluation + report, on the real local SLURM."""
    tmp = tmp_path_factory.mktemp("slurm-e2e")
    with_progress = [o for o in TINY if o != "log.progress=false"]  # what a user's run has: no bar may reach .out
    methods = {"kd": {"config": "configs/demo/distill.yaml", "label": "KD", "overrides": with_progress}}
    # the jobs' Python through a wrapper standing in for `apptainer exec image.sif python`: it notes each start
    wrapper = tmp / "container-python"
    wrapper.write_text(f'#!/bin/sh\necho "$SLURM_JOB_ID" >> {tmp / "wrapper.log"}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    resources = {"default": dict(CPU, python=str(wrapper)), "teacher": {"tasks_per_node": 2}}
    path = tiny_experiment(tmp, launch_shards, "e2e", methods, resources=resources)
    t0 = time.monotonic()
    record = launch_experiment(path, cluster="slurm", wait=True, wait_timeout_s=240)
    return record, tmp / "runs" / "e2e", time.monotonic() - t0


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_experiment_end_to_end(slurm_experiment, small_dataset):
    record, exp_dir, seconds = slurm_experiment
    jobs = {j["key"]: j for j in record["jobs"]}
    assert list(jobs) == ["teacher", "kd", "evaluate"]
    kd = jobs["kd"]
    assert kd["array"] and [t["job_id"] for t in kd["tasks"]] == [f"{kd['slurm_id']}_0", f"{kd['slurm_id']}_1"]
    assert kd["dependency"] == f"afterok:{jobs['teacher']['slurm_id']}"
    assert [t["result"]["run_dir"] for t in kd["tasks"]] == [str(exp_dir / "kd-5x"), str(exp_dir / "kd-2.5x")]
    for mag in ("5x", "2.5x"):
        rec = json.loads((exp_dir / f"kd-{mag}" / "eval" / "test.json").read_text())
        assert rec["method"] == "KD" and rec["mag"] == float(mag[:-1])
        assert rec["samples"] == small_dataset["manifest"]["splits"]["test"]["samples"]  # every test tissue scored
        assert list((exp_dir / f"kd-{mag}" / "tb").glob("events.out.tfevents.*"))
    report = (exp_dir / "report" / "report.md").read_text()
    assert "KD" in report and jobs["evaluate"]["tasks"][0]["result"]["report"] == str(exp_dir / "report" / "report.md")
    assert Path(kd["tasks"][1]["stdout"]).is_file() and f"{kd['slurm_id']}_1" in kd["tasks"][1]["stdout"]
    rows = experiment_status(exp_dir)
    assert [r["state"] for r in rows] == ["COMPLETED"] * 4
    check_production_outputs(record, exp_dir)
    print(f"end-to-end experiment on SLURM: {seconds:.0f}s")


def check_production_outputs(record: dict, exp_dir: Path) -> None:
    """Every job ran its Python through the wrapper given as the interpreter; the run folder, its export, the
    evaluation and the report record how they were made (with the SLURM job); metrics.jsonl is written; the jobs'
    .out files hold plain lines, never a redrawn progress bar."""
    import torch

    from hpcdistill.common.provenance import current_command

    started = (exp_dir.parents[1] / "wrapper.log").read_text().split()
    assert {j["slurm_id"] for j in record["jobs"]} <= set(started)
    kd = next(j for j in record["jobs"] if j["key"] == "kd")
    run = exp_dir / "kd-2.5x"
    in_folder = json.loads((run / "provenance.json").read_text())
    assert in_folder["slurm"]["array_job"] == kd["slurm_id"]
    assert in_folder["command"] == current_command()  # the launching process's, not submitit's entry point
    assert torch.load(run / "best.pt", weights_only=True)["provenance"]["slurm"]["array_job"] == kd["slurm_id"]
    evaluation = json.loads((run / "eval" / "test.json").read_text())
    assert evaluation["provenance"]["slurm"] and evaluation["model_provenance"]["git"] == in_folder["git"]
    assert "## How these results were made" in (exp_dir / "report" / "report.md").read_text()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in lines} == {"train", "validation"}
    logs = Path(kd["tasks"][1]["stdout"]).read_text() + Path(kd["tasks"][1]["stderr"]).read_text()
    assert "\r" not in logs and "it/s]" not in logs and "kd-2.5x: epoch 1/1, step 0/" in logs


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_two_task_job_trains_with_two_ranks(slurm_experiment, small_dataset):
    record, exp_dir, _ = slurm_experiment
    teacher = record["jobs"][0]
    assert teacher["ntasks"] == 2
    results = teacher["tasks"][0]["result"]
    assert isinstance(results, list) and len(results) == 2  # one result per rank
    # the train samples over world size 2 at 1 sample per step: half the steps of one rank, the same on both
    train = small_dataset["manifest"]["splits"]["train"]["samples"]
    steps = per_rank_samples(train, 2, 1)
    assert steps == -(-train // 2) and [r["global_step"] for r in results] == [steps, steps]
    assert results[0]["best"] == results[1]["best"]  # validated together: both ranks agree on the best epoch
    log = Path(teacher["tasks"][0]["stdout"]).read_text()
    assert "rank 0/2" in log
    assert "rank 1/2" in Path(teacher["tasks"][0]["stdout"].replace("_0_log.out", "_1_log.out")).read_text()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_time_limit_requeues_resumes_and_bounds_the_requeues(slurm_cluster, launch_shards, tmp_path):
    # Training that no two 1-minute runs can finish, with one requeue allowed. slurmctld checks time limits every 30 s
    # and signals up to one check early, so with a 5 s delay the signal comes 25-55 s into each run, whatever the
    # machine's speed: the first run is requeued, the second resumes from the latest checkpoint and, signalled
    # again, ends the job as failed in one line instead of requeueing forever.
    every = 200
    overrides = [*TINY, "data.epoch_samples=1000000", f"train.checkpoint_every_steps={every}", "data.val=[]"]
    resources = {"default": dict(CPU, timeout_min=1, signal_delay_s=5, max_requeue=1)}
    path = tiny_experiment(
        tmp_path,
        launch_shards,
        "timelimit",
        {},
        resources=resources,
        evaluate={"enabled": False},
        teacher={"config": "configs/demo/teacher.yaml", "overrides": overrides},
    )
    with pytest.raises(LaunchError) as info:
        launch_experiment(path, cluster="slurm", wait=True, wait_timeout_s=240)
    message = str(info.value)
    assert message.startswith("teacher: job ") and "timed-out too many times" in message and "\n" not in message
    task = json.loads((tmp_path / "runs" / "timelimit" / "launch.json").read_text())["jobs"][0]["tasks"][0]
    assert final_history(task["job_id"]) == ["REQUEUED", "FAILED"]
    (start,), runs = check_resumed_runs(task, every, runs_expected=2)
    assert runs[1][-1] > start + every  # the second run made progress of its own before its signal


@contextlib.contextmanager
def slurm_setting(key: str, value: str):
    """The running local cluster with `key=value` in its slurm.conf (scontrol reconfigure), restored after."""
    conf = Path(os.environ["SLURM_CONF"])
    before = conf.read_text()
    conf.write_text(re.sub(rf"^{key}=.*$", f"{key}={value}", before, flags=re.M))
    try:
        subprocess.run(["scontrol", "reconfigure"], check=True, capture_output=True, timeout=60)
        shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
        assert re.search(rf"^{key}\s*=\s*{value}$", shown, re.M), f"{key} is not {value} after reconfigure"
        yield
    finally:
        conf.write_text(before)
        subprocess.run(["scontrol", "reconfigure"], check=True, capture_output=True, timeout=60)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("job_requeue", ["1", "0"])
def test_slurm_preempted_job_resumes_and_completes(slurm_cluster, launch_shards, tmp_path, job_requeue):
    """JobRequeue=0 (a site's default that makes jobs not requeueable unless they ask): the generated script asks
    (--requeue), so the preempted job is requeued and resumes there too."""
    with slurm_setting("JobRequeue", job_requeue):
        preempt_and_resume(launch_shards, tmp_path)


def preempt_and_resume(launch_shards: Path, tmp_path: Path) -> None:
    # Preemption with PreemptMode=REQUEUE kills the job and queues it again, with no signal to catch first:
    # `scontrol requeue` does exactly that, here as soon as the first checkpoint is complete. The rerun resumes.
    # On the small real shards a step takes ~10 ms on one core: the first checkpoint comes ~1.5 s into training,
    # the whole run takes ~30 s, so the requeue always lands in between.
    steps, every = 3000, 150
    overrides = [*TINY, f"data.epoch_samples={steps}", f"train.checkpoint_every_steps={every}", "data.val=[]"]
    path = tiny_experiment(
        tmp_path,
        launch_shards,
        "preempt",
        {},
        resources={"default": CPU},
        evaluate={"enabled": False},
        teacher={"config": "configs/demo/teacher.yaml", "overrides": overrides},
    )
    from hpcdistill.train.run_folder import complete_checkpoints

    exp_dir = tmp_path / "runs" / "preempt"
    with ThreadPoolExecutor(1) as pool:
        launched = pool.submit(launch_experiment, path, cluster="slurm", wait=True, wait_timeout_s=240)
        deadline = time.monotonic() + 120
        while not complete_checkpoints(exp_dir / "teacher" / "checkpoints") and time.monotonic() < deadline:
            assert not launched.done(), launched.exception()
            time.sleep(0.1)
        job_id = json.loads((exp_dir / "launch.json").read_text())["jobs"][0]["tasks"][0]["job_id"]
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, timeout=30)
        record = launched.result()
    task = record["jobs"][0]["tasks"][0]
    assert task["result"]["global_step"] == steps and not task["result"]["stopped_early"]
    assert final_history(job_id) == ["REQUEUED", "COMPLETED"]
    script = next((exp_dir / "slurm").glob("*/*/*_submission.sh")).read_text()
    assert "#SBATCH --requeue" in script
    _, runs = check_resumed_runs(task, every, runs_expected=2)
    assert sorted(set(s for run in runs for s in run)) == list(range(1, steps + 1))


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_slurm_multi_task_job_ends_when_one_rank_dies(slurm_cluster, launch_shards, tmp_path):
    """A real 2-rank teacher job: once both ranks train, rank 1's process is killed (as the OOM killer or a lost
    node would). The job must end FAILED at once (srun --kill-on-bad-exit), rank 0 killed rather than left waiting
    in a collective, and the run must not look finished (no last.pt)."""
    long = [*TINY, "train.epochs=200"]  # far longer than the test: only the kill can end it
    teacher = {"config": "configs/demo/teacher.yaml", "overrides": long}
    resources = {"default": dict(CPU, tasks_per_node=2, max_requeue=0)}
    path = tiny_experiment(tmp_path, launch_shards, "die", {}, teacher=teacher, resources=resources)
    record = launch_experiment(path, cluster="slurm", wait=False)
    job_id = record["jobs"][0]["slurm_id"]
    rank1 = wait_for_rank_process(job_id, rank=1, run_dir=tmp_path / "runs" / "die" / "teacher", timeout_s=150)
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    assert sacct_wait_final(job_id, 90)[-1][0] == "FAILED"
    assert time.monotonic() - killed < 90  # not the collective's timeout
    assert not (tmp_path / "runs" / "die" / "teacher" / "last.pt").exists()


def wait_for_rank_process(job_id: str, rank: int, run_dir: Path, timeout_s: float) -> int:
    """The pid of the job's task `rank` once training has started (progress.json written), read from /proc."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (run_dir / "progress.json").is_file():
            pids = task_pids(job_id, rank)
            if pids:
                return pids[0]
        time.sleep(1)
    raise AssertionError(f"job {job_id}: rank {rank} never started training in {run_dir}")


def task_pids(job_id: str, rank: int) -> list[int]:
    """The task's own process: python running submitit's entry with the job's id and this SLURM_PROCID, and not a
    child of another such process (loader workers share their parent's environment and command line)."""
    found: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        try:
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
            cmdline = (proc / "cmdline").read_text()
        except (OSError, ValueError):
            continue
        if environ.get("SLURM_JOB_ID") == str(job_id) and environ.get("SLURM_PROCID") == str(rank):
            if "python" in cmdline and "submitit" in cmdline:
                found[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return sorted(pid for pid, parent in found.items() if parent not in found)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_slurm_crashing_job_is_reported_failed(slurm_cluster, launch_shards, tmp_path):
    methods = {"kd": {"config": "configs/demo/distill.yaml", "overrides": TINY}}
    teacher = {"config": "configs/demo/teacher.yaml", "overrides": [*TINY, "model.num_classes=5"]}  # manifest has 3
    path = tiny_experiment(tmp_path, launch_shards, "crash", methods, teacher=teacher, resources={"default": CPU})
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch_experiment(path, cluster="slurm", wait=True, wait_timeout_s=150)
    message = str(info.value)
    assert message.startswith("teacher: job ") and "failed" in message and "model.num_classes: 5" in message
    assert "\n" not in message and time.monotonic() - t0 < 150
    exp_dir = tmp_path / "runs" / "crash"
    deadline = time.monotonic() + 60
    while True:  # SLURM cancels the dependants (kill-on-invalid-dep) instead of leaving them pending
        states = {r["task"]: r["state"] for r in experiment_status(exp_dir)}
        # every dependant, evaluate included: SLURM may cancel them in different scheduler passes, and a job sacct
        # has not recorded yet reads UNKNOWN
        if set(states.values()) <= SLURM_FINAL_STATES or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert states == {"teacher": "FAILED", "kd-5x": "CANCELLED", "kd-2.5x": "CANCELLED", "evaluate": "CANCELLED"}
