"""Submit a job graph (cluster.job_plan) to SLURM through submitit, or run it on this machine; record every job in
`<exp dir>/launch.json` from the start, and optionally wait.

- slurm: everything is submitted at once with dependencies; `wait=True` then waits for every result.
- local/debug: this process schedules the tasks by their dependencies on the machine's cores (local_runner.py).
- Each launch gets a fresh submitit folder `<exp dir>/slurm/<stamp>/`, logs at `<stamp>/%A_%a/` (arrays) or
  `<stamp>/%j/`: SLURM job ids restart when a (test) cluster is reset, and a reused folder would return stale results.
- Time limits: `timeout_min * 60` must exceed `signal_delay_s` (checked at load). slurmctld checks limits every 30 s
  and may signal up to one check early, so on short limits the signal comes 0-30 s before `signal_delay_s`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Literal

from hpcdistill.cluster.dry_run import render_dry_run
from hpcdistill.cluster.job_plan import JobPlan, dependency_string, slurm_parameters
from hpcdistill.cluster.launch_record import job_record, record_submission, store_result, write_record
from hpcdistill.common.errors import LaunchError, one_line
from hpcdistill.common.progress import LiveStatus

Cluster = Literal["slurm", "local", "debug"]


def launch_graph(
    name: str,
    exp_dir: Path,
    jobs: list[JobPlan],
    cluster: Cluster = "slurm",
    *,
    dry_run: bool = False,
    wait: bool = False,
    wait_timeout_s: float | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Submit or run a job graph (an experiment's, a sharding or prediction array's) with its record in
    `exp_dir`/launch.json; `source` is what it came from (the experiment file, or the command)."""
    if cluster not in ("slurm", "local", "debug"):
        raise LaunchError(f"cluster: expected slurm, local or debug, got {cluster!r}")
    if dry_run:
        return _dry_run(name, exp_dir, jobs)
    folder = Path(exp_dir) / "slurm" / (time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6])
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"name": name, "experiment": source, "exp_dir": str(exp_dir), "cluster": cluster}
    record.update(folder=str(folder), created=time.strftime("%Y-%m-%dT%H:%M:%S"), jobs=[])
    save = lambda: write_record(Path(exp_dir), folder, record)  # noqa: E731
    if cluster != "slurm":
        save()  # from the start: `hpcdistill status` works while a local launch runs
    try:  # the record is written even when a submission or a job fails: status and scancel need the ids
        if cluster == "slurm":
            submitted = _submit_slurm(name, jobs, folder, record)
            if wait:
                save()
                _wait_all(submitted, record, wait_timeout_s, save)
        else:
            from hpcdistill.cluster.local_runner import LocalRunner

            LocalRunner(jobs, {job.key: job.callables for job in jobs}, folder, cluster, record, save).run()
    finally:
        if cluster != "slurm" or record["jobs"]:
            save()
        else:  # nothing submitted: no record, no folder (an earlier launch's launch.json stays as it was)
            shutil.rmtree(folder, ignore_errors=True)
        for literal in folder.glob("%j"):  # submitit makes the id-pattern folder itself; logs go to the real ids
            if literal.is_dir() and not any(literal.iterdir()):
                literal.rmdir()
    return record


def _dry_run(name: str, exp_dir: Path, jobs: list[JobPlan]) -> dict[str, Any]:
    text = render_dry_run(name, exp_dir, jobs)
    print(text)
    graph = {j.key: {"after_ok": j.after_ok, "after_corr": j.after_corr} for j in jobs}
    return {"name": name, "exp_dir": str(exp_dir), "dry_run": True, "text": text, "graph": graph}


def _submit_slurm(name: str, jobs: list[JobPlan], folder: Path, record: dict[str, Any]) -> list[tuple]:
    import submitit

    ids: dict[str, str] = {}
    submitted = []
    for job in jobs:
        dependency = dependency_string(job, ids)
        r = job.resources
        ex = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=r.max_requeue, python=r.python)
        try:
            ex.update_parameters(**slurm_parameters(job, name, dependency))
            fns = job.callables
            out = ex.submit_array(fns) if job.is_array else [ex.submit(fns[0])]
        except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError, ValueError) as err:
            done = ", ".join(f"{k}={v}" for k, v in ids.items()) or "none"
            raise LaunchError(f"{job.key}: sbatch failed ({one_line(err, 300)}); already submitted: {done}") from None
        ids[job.key] = out[0].job_id.split("_")[0]
        entry = job_record(job)
        entry["dependency"] = dependency
        for index, sub in enumerate(out):
            record_submission(entry, index, sub)
        record["jobs"].append(entry)
        submitted.append((job, out))
    return submitted


def _wait_all(
    submitted: list[tuple], record: dict[str, Any], timeout_s: float | None, on_job_done: Callable[[], None]
) -> None:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for (job, out), entry in zip(submitted, record["jobs"]):
        _wait_job(job, out, entry, deadline, LiveStatus())
        on_job_done()


def _wait_job(job: JobPlan, out: list[Any], entry: dict[str, Any], deadline: float | None, display: LiveStatus) -> None:
    """Wait for every task, showing their progress; store results, states and the job's end time; a failure
    raises one line naming the job and its log."""
    entry.setdefault("started", time.time())
    try:
        for task, sub in zip(entry["tasks"], out):
            polls = 0
            while not sub.done(force_check=polls % 10 == 9):  # sacct at least every 10 s: a killed job writes no result
                polls += 1
                if deadline is not None and time.monotonic() > deadline:
                    raise LaunchError(
                        f"{job.key}: job {sub.job_id} not finished in time (state {sub.state}); log: {task['stdout']}"
                    )
                display.update([entry])
                time.sleep(1)
            store_result(job.key, sub, task)
    finally:
        entry["finished"] = time.time()
        display.update([entry])
        display.close()
