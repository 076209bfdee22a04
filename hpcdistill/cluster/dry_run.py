"""`hpcdistill launch --dry-run`: the dependency graph and every job's sbatch script, as submitit would write it,
with job ids shown as <job key>; nothing is submitted or written."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from hpcdistill.cluster.job_plan import JobPlan, dependency_string, slurm_parameters


def render_dry_run(name: str, exp_dir: Path, jobs: list[JobPlan]) -> str:
    """The dependency graph and each job's sbatch script, ids shown as <key>."""
    ids = {j.key: f"<{j.key}>" for j in jobs}
    lines = [f"# {name}: {exp_dir}", "# dependency graph"]
    for job in jobs:
        dep = dependency_string(job, ids) or "none"
        what = f"array[{len(job.tasks)}] " + ", ".join(t.name for t in job.tasks) if job.is_array else job.tasks[0].name
        lines.append(f"{job.key:<12} {what}  <- {dep}")
        lines += [f"{'':<12} gate: {job.gate}"] if job.gate else []
    folder = Path(exp_dir) / "slurm" / "<launch>" / "%j"
    for job in jobs:
        python = job.resources.python or shlex.quote(sys.executable)  # submitit's command: the job's interpreter
        command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
        params = slurm_parameters(job, name, dependency_string(job, ids))
        lines += [
            "",
            f"# ---- sbatch script: {job.key} ----",
            sbatch_script(command, folder, params, len(job.tasks) if job.is_array else None),
        ]
        for task in job.tasks:
            what = f"{task.config} {' '.join(shlex.quote(o) for o in task.overrides)}" if task.config else task.run_dir
            lines.append(f"# {task.name}: {what}".rstrip())
    return "\n".join(lines)


def sbatch_script(command: str, folder: Path, params: dict[str, Any], array: int | None) -> str:
    """submitit's own sbatch text for these parameters (its private renderer: the script is exactly what would be
    submitted; a submitit upgrade that changes it fails the dry-run test, not a user's submission)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=command, folder=str(folder), map_count=array, **params)
