"""`<exp dir>/launch.json`: the record of one launch (every job, its tasks' ids, logs, run and TensorBoard folders,
states), written at the start and after every change, so `hpcdistill status` and scancel work while it runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpcdistill.cluster.job_plan import JobPlan
from hpcdistill.common.errors import LaunchError, traceback_line
from hpcdistill.common.files import atomic_write_text


def write_record(exp_dir: Path, folder: Path, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=2, default=str)
    atomic_write_text(folder / "launch.json", text)
    atomic_write_text(exp_dir / "launch.json", text)  # the latest launch; each launch's own copy stays in its folder


def job_record(job: JobPlan) -> dict[str, Any]:
    """A job's entry in launch.json before it is submitted; `record_submission` fills in each task's id and logs."""
    tasks = [
        {
            "name": t.name,
            "mag": t.mag,
            "run_dir": t.run_dir,
            "job_id": None,
            "stdout": None,
            "stderr": None,
            "tensorboard": str(Path(t.run_dir) / "tb") if job.kind in ("teacher", "method") else None,
            "state": "PENDING",
        }
        for t in job.tasks
    ]
    return {
        "key": job.key,
        "kind": job.kind,
        "label": job.label,
        "array": job.is_array,
        "slurm_id": None,
        "ntasks": job.resources.nodes * job.resources.tasks,
        "dependency": None,
        "after_ok": job.after_ok,
        "after_corr": job.after_corr,
        "tasks": tasks,
    }


def record_submission(entry: dict[str, Any], index: int, sub: Any) -> None:
    """Task `index` of the job in `entry` was submitted as submitit job `sub`."""
    entry["slurm_id"] = entry["slurm_id"] or str(sub.job_id).split("_")[0]
    entry["tasks"][index].update(
        job_id=str(sub.job_id), stdout=str(sub.paths.stdout), stderr=str(sub.paths.stderr), state=None
    )


def store_result(job_key: str, submitted: Any, task: dict[str, Any]) -> None:
    """A finished task's result and state into its launch.json entry; a failed task raises one line naming the job,
    the raised error (from the traceback submitit returns) and the task's log."""
    try:
        results = submitted.results()
    except Exception as err:  # submitit raises FailedJobError / UncompletedJobError with the job's traceback
        task["state"] = "FAILED"
        raise LaunchError(
            f"{job_key}: job {submitted.job_id} ({task['name']}) failed: {traceback_line(str(err))}; "
            f"log: {task['stderr']}"
        ) from None
    task["state"] = "COMPLETED"
    task["result"] = results[0] if len(results) == 1 else results
