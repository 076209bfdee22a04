"""`hpcdistill launch`: an experiment file's job graph, submitted to SLURM or run on this machine."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from hpcdistill.cluster.submit import Cluster, launch_graph
from hpcdistill.common.console import say
from hpcdistill.common.errors import LaunchError
from hpcdistill.common.folder_lock import one_writer
from hpcdistill.experiment.experiment_file import load_experiment
from hpcdistill.experiment.graph import plan_jobs


def launch_experiment(
    experiment_path: str | Path,
    cluster: Cluster = "slurm",
    dry_run: bool = False,
    wait: bool = False,
    wait_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Submit (slurm) or run (local/debug) an experiment; returns the launch record (also <exp dir>/launch.json).

    slurm: everything is submitted at once with dependencies; `wait=True` then waits for every job's result.
    local/debug: this process schedules the tasks by their dependencies on the machine's cores (local_runner).
    dry_run: print the sbatch scripts and the dependency graph; nothing is submitted or written.
    """
    exp = load_experiment(experiment_path)
    jobs = plan_jobs(exp)
    problems = preflight(exp, jobs, cluster)
    if problems and not dry_run:
        raise LaunchError(problems[0])
    for line in problems:
        say(f"--dry-run: {line}")
    existed = exp.exp_dir.exists()
    try:
        # held while this process submits or runs the jobs (local/debug): `status` tells a live runner from a dead one
        with contextlib.nullcontext() if dry_run else one_writer(exp.exp_dir):
            return launch_graph(
                exp.name,
                exp.exp_dir,
                jobs,
                cluster,
                dry_run=dry_run,
                wait=wait,
                wait_timeout_s=wait_timeout_s,
                source=exp.path,
            )
    except LaunchError:
        if not existed:
            _remove_if_unused(exp.exp_dir)
        raise


def preflight(exp: Any, jobs: list[Any], cluster: Cluster) -> list[str]:
    """What would make the launch fail or run on nothing, one line each: SLURM's tools missing, a partition or
    account left as the example file's placeholder, the shards missing when no shard stage makes them."""
    found = []
    if cluster == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            found.append(
                f"{' and '.join(missing)}: not found on PATH: this machine has no SLURM client; launch from a login "
                "node, or run here with --cluster local"
            )
        for job in jobs:
            for key in ("partition", "account"):
                value = getattr(job.resources, key) or ""
                if value.upper().startswith("YOUR_"):
                    found.append(
                        f"{exp.path}: resources for {job.key}: {key} {value!r} is the example's placeholder; set your "
                        "cluster's (sinfo -s, sacctmgr show assoc user=$USER)"
                    )
                    break
    if exp.shard is None and not (Path(exp.shards) / "manifest.json").is_file():
        found.append(f"{exp.shards}: no manifest.json: shard the slides first (or add a `shard:` stage)")
    return found


def _remove_if_unused(folder: Path) -> None:
    """An experiment folder this launch made and that holds nothing a job wrote (no job was submitted)."""
    try:
        jobs = json.loads((folder / "launch.json").read_text()).get("jobs")
    except (OSError, ValueError, AttributeError):
        jobs = None  # no record: nothing was submitted
    if not jobs:
        shutil.rmtree(folder, ignore_errors=True)
