"""The cluster slurm/cluster.sh started (SLURM_CONF from `cluster.sh env`), and sacct read back per run."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL"}
CLUSTER = Path(__file__).resolve().parents[1] / "cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    subprocess.run(["bash", str(CLUSTER), "start"], check=True)
    env = subprocess.run(["bash", str(CLUSTER), "env"], check=True, text=True, capture_output=True).stdout
    os.environ["SLURM_CONF"] = env.strip().split("=", 1)[1]
    os.environ["PATH"] += os.pathsep + "/usr/sbin:/sbin"


def sacct_runs(job_id: str | int) -> list[tuple[str, str]]:
    """(State, ExitCode) of every run of a job, a requeued run included."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "--duplicates", "-j", str(job_id), "-o", "JobID,State,ExitCode"],
        check=True,
        text=True,
        capture_output=True,
        timeout=30,
    ).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return [(state.split()[0], code) for jid, state, code in rows if jid == str(job_id)]


def sacct_wait_final(job_id: str | int, timeout: float) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    history: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        history = sacct_runs(job_id)
        if history and history[-1][0] in FINAL:
            return history
        time.sleep(0.5)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f}s; sacct says {history}")
