"""`hpcdistill status`: one row per task of an experiment's latest launch (read from `<exp dir>/launch.json`), with
its state (submitit's batched sacct watcher on SLURM; submitit's result files otherwise), progress, log and
TensorBoard folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpcdistill.common.errors import LaunchError
from hpcdistill.common.folder_lock import folder_held
from hpcdistill.common.progress import describe, read_progress


def slurm_states(record: dict[str, Any]) -> dict[str, str]:
    """{task job id ("12" or "12_0"): state} for every submitted task, from one batched sacct call by submitit's
    watcher ("UNKNOWN" where sacct cannot answer, e.g. status read off the cluster)."""
    import submitit

    jobs = [
        submitit.SlurmJob(record["folder"], task["job_id"])
        for job in record["jobs"]
        for task in job["tasks"]
        if task["job_id"]
    ]
    return {job.job_id: job.state.split()[0] for job in jobs}  # "CANCELLED by 0" -> CANCELLED


def experiment_status(exp_dir: str | Path) -> list[dict[str, Any]]:
    """One row per task of the latest launch in exp_dir: job, state, progress, log and TensorBoard paths."""
    exp_dir = Path(exp_dir)
    path = exp_dir / "launch.json"
    if not path.is_file():
        raise LaunchError(f"{exp_dir}: no launch.json (not an experiment folder launched by `hpcdistill launch`)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LaunchError(f"{path}: invalid JSON ({err.msg})") from None
    on_slurm = record.get("cluster") == "slurm"
    states = slurm_states(record) if on_slurm else {}
    reasons = pending_reasons([j for j, s in states.items() if s == "PENDING"]) if on_slurm else {}
    runner_alive = on_slurm or folder_held(exp_dir)  # a local launch's runner holds the folder while it lives
    rows = []
    for job in record["jobs"]:
        for task in job["tasks"]:
            state = states.get(task["job_id"])
            if task["job_id"] is None:  # a local launch has not started it yet
                state = task.get("state") or "PENDING"
            elif state in (None, "UNKNOWN", "RUNNING", "COMPLETING"):  # the result file is written just before the end
                running = "UNKNOWN" if on_slurm else "RUNNING"  # local: started, no result yet
                state = _result_state(task) or (state if state != "UNKNOWN" else None) or task.get("state") or running
            if not runner_alive and state in ("RUNNING", "PENDING"):  # its runner was stopped (Ctrl-C, a kill)
                state = "STOPPED" if state == "RUNNING" else "NOT STARTED"
            progress = describe(read_progress(task["run_dir"])) if job["kind"] != "evaluate" else "-"
            progress = progress.split(", ETA")[0] if state == "STOPPED" else progress  # no ETA for a dead run
            if state == "PENDING" and reasons.get(task["job_id"]):
                state = f"PENDING ({reasons[task['job_id']]})"
            rows.append(
                {
                    "job": job["key"],
                    "task": task["name"],
                    "job_id": task["job_id"],
                    "state": state,
                    "progress": progress,
                    "hosts": ",".join(rank_hosts(task["run_dir"])) or None,
                    "run_dir": task["run_dir"],
                    "log": task["stdout"],
                    "tensorboard": task["tensorboard"],
                }
            )
    return rows


def pending_reasons(job_ids: list[str]) -> dict[str, str]:
    """{job id: why SLURM keeps it pending (squeue's reason, e.g. "ReqNodeNotAvail, UnavailableNodes:node2")}."""
    import subprocess

    if not job_ids:
        return {}
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%r"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def rank_hosts(run_dir: str | Path) -> list[str]:
    """The hosts the run's ranks ran on at its latest start (train.distributed.record_ranks), in rank order."""
    records = []
    for path in sorted(Path(run_dir, "ranks").glob("rank*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not records:
        return []
    world = max(records, key=lambda r: r.get("started", 0)).get("world_size", len(records))
    current = sorted((r for r in records if r.get("rank", 0) < world), key=lambda r: r.get("rank", 0))
    return list(dict.fromkeys(str(r.get("host")) for r in current))


def _result_state(task: dict[str, Any]) -> str | None:
    """From submitit's result file next to the log: COMPLETED / FAILED, or None while there is none."""
    folder = Path(task["stdout"]).parent
    found = list(folder.glob(f"{task['job_id']}_*_result.pkl"))
    if not found:
        return None
    import submitit

    outcome, _ = submitit.core.utils.pickle_load(found[0])
    return "COMPLETED" if outcome == "success" else "FAILED"


def format_status(rows: list[dict[str, Any]]) -> str:
    """A plain text table of `experiment_status()` rows."""
    cols = ["job", "task", "job_id", "state", "progress", "hosts", "log", "tensorboard"]
    table = [cols] + [[str(r[c] if r[c] is not None else "-") for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)
