"""The local test cluster's own behaviour, which the launcher relies on: states and exit codes, srun tasks,
time-limit signals and requeues, submitit's results and its requeue. These check the environment, not hpcdistill
(the product's SLURM tests are in tests/integration/); run them with `bash slurm/cluster.sh selftest` when a
product test on SLURM fails and the cluster itself is in doubt."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import sacct_runs, sacct_wait_final

pytestmark = pytest.mark.usefixtures("slurm_cluster")


def _sbatch(*args: str, env: dict[str, str] | None = None) -> int:
    out = subprocess.run(
        ["sbatch", "--parsable", *args], check=True, text=True, capture_output=True, timeout=30, env=env
    )
    return int(out.stdout.strip().split(";")[0])


def _wait_final(job_id: int, timeout: float) -> tuple[str, str]:
    """(State, ExitCode) of the job's latest run once it is final; fails with its history on timeout."""
    return sacct_wait_final(job_id, timeout)[-1]


@pytest.mark.timeout(120)
def test_trivial_job_completes(tmp_path):
    out = tmp_path / "ok.out"
    job = _sbatch(f"--chdir={tmp_path}", f"--output={out}", "--wrap", "echo hello-from-$SLURM_JOB_ID")
    assert _wait_final(job, timeout=60) == ("COMPLETED", "0:0")
    assert out.read_text().strip() == f"hello-from-{job}"


@pytest.mark.timeout(120)
def test_failing_job_is_reported_failed(tmp_path):
    job = _sbatch(f"--chdir={tmp_path}", f"--output={tmp_path / 'fail.out'}", "--wrap", "exit 1")
    t0 = time.monotonic()
    assert _wait_final(job, timeout=60) == ("FAILED", "1:0")
    assert time.monotonic() - t0 < 60


@pytest.mark.timeout(120)
def test_two_task_job_runs_both_tasks(tmp_path):
    out = tmp_path / "two.out"
    job = _sbatch(
        f"--chdir={tmp_path}",
        f"--output={out}",
        "--ntasks=2",
        "--wrap",
        "srun bash -c 'echo task=$SLURM_PROCID ntasks=$SLURM_NTASKS'",
    )
    assert _wait_final(job, timeout=60) == ("COMPLETED", "0:0")
    assert sorted(out.read_text().split("\n")[:2]) == ["task=0 ntasks=2", "task=1 ntasks=2"]


# The step traps SIGUSR1 (sent up to 60 s before the 1-minute limit) and requeues its own job, as submitit's
# handler does; the second run (SLURM_RESTART_COUNT=1) exits at once.
REQUEUE_SCRIPT = """#!/bin/bash
echo "run restart=${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then exit 0; fi
srun bash -c 'trap "touch got-usr1; scontrol requeue \\$SLURM_JOB_ID; exit 0" USR1; while true; do sleep 1; done'
"""


@pytest.mark.timeout(200)
def test_time_limited_job_requeues_itself_and_runs_again(tmp_path):
    script = tmp_path / "requeue.sh"
    script.write_text(REQUEUE_SCRIPT)
    out = tmp_path / "requeue.out"
    job = _sbatch(
        f"--chdir={tmp_path}",
        f"--output={out}",
        "--open-mode=append",
        "--time=1",
        "--signal=USR1@50",
        "--requeue",
        str(script),
    )
    assert _wait_final(job, timeout=170) == ("COMPLETED", "0:0")
    # sacct keeps the requeued run as a duplicate record before the final one.
    assert [state for state, _ in sacct_runs(job)] == ["REQUEUED", "COMPLETED"]
    lines = out.read_text().splitlines()
    assert lines[0] == "run restart=0" and lines[-1] == "run restart=1", lines
    assert (tmp_path / "got-usr1").exists()
    show = subprocess.run(["scontrol", "show", "job", str(job)], check=True, text=True, capture_output=True).stdout
    assert "Restarts=1" in show


JOB_FUNCTIONS = '''
import os
import time

import submitit


def describe(x):
    env = submitit.JobEnvironment()
    return {"square": x * x, "rank": env.global_rank, "tasks": env.num_tasks, "job_id": env.job_id}


class SleepUntilRequeued(submitit.helpers.Checkpointable):
    """First run sleeps into its time limit; submitit's signal handler checkpoints and requeues it."""

    def __call__(self, log_path):
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        with open(log_path, "a") as log:
            log.write(f"run restart={restarts}\\n")
        if restarts == 0:
            time.sleep(600)
        return restarts
'''


@pytest.fixture
def job_functions(tmp_path, monkeypatch):
    """A module of job functions importable both here and inside jobs (sbatch passes PYTHONPATH on)."""
    (tmp_path / "slurm_job_functions.py").write_text(JOB_FUNCTIONS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    import slurm_job_functions

    return slurm_job_functions


def _executor(tmp_path: Path):
    submitit = pytest.importorskip("submitit")
    # Job ids restart when the cluster's state folder is reset: a fresh submitit folder per run avoids stale results.
    return submitit.AutoExecutor(folder=tmp_path / f"submitit-{uuid.uuid4().hex[:8]}", cluster="slurm")


@pytest.mark.timeout(120)
def test_submitit_returns_results_from_one_and_two_tasks(tmp_path, job_functions):
    executor = _executor(tmp_path)
    executor.update_parameters(timeout_min=5, cpus_per_task=1)
    single = executor.submit(job_functions.describe, 7)
    executor.update_parameters(tasks_per_node=2)
    double = executor.submit(job_functions.describe, 3)

    assert single.result() == {"square": 49, "rank": 0, "tasks": 1, "job_id": single.job_id}
    results = sorted(double.results(), key=lambda r: r["rank"])
    assert [(r["square"], r["rank"], r["tasks"]) for r in results] == [(9, 0, 2), (9, 1, 2)]
    assert _wait_final(int(double.job_id), timeout=30)[0] == "COMPLETED"


@pytest.mark.timeout(200)
def test_submitit_checkpointable_job_is_requeued_at_its_time_limit(tmp_path, job_functions):
    executor = _executor(tmp_path)
    # timeout_min must exceed the signal delay, or submitit treats the job as timed out at once.
    executor.update_parameters(timeout_min=1, slurm_signal_delay_s=50)
    log = tmp_path / "runs.log"
    job = executor.submit(job_functions.SleepUntilRequeued(), str(log))
    assert job.result() == 1
    assert log.read_text().splitlines() == ["run restart=0", "run restart=1"]
    assert [state for state, _ in sacct_runs(int(job.job_id))][0] == "REQUEUED"
