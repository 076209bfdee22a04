"""The flags that send `shard` and `predict` to an array of tasks (`--cluster`, `--tasks`, the SLURM resources),
and running such an array through the launcher, shared by both subcommands."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from hpcdistill.cluster.job_plan import Resources

CLUSTERS = ["debug", "local", "slurm"]  # what --cluster means in every subcommand that has it


ARRAY_DEFAULTS = {"gpus_per_node": 0, "mem_gb": 16.0, "timeout_min": Resources().timeout_min}


def add_cluster_flags(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group(f"as an array of tasks ({what} over SLURM or local processes)")
    defaults = Resources()
    group.add_argument(
        "--cluster",
        choices=CLUSTERS,
        help="split the slides over --tasks array tasks: a SLURM array through submitit, local processes, or "
        "debug (each task in turn in this process); then merge (default: this process alone)",
    )
    group.add_argument("--tasks", type=int, default=1, help="array tasks (slides balanced across them)")
    group.add_argument("--wait", action="store_true", help="slurm: wait until the merge job has finished")
    group.add_argument(
        "--resources",
        metavar="FILE",
        help="the SLURM settings of the tasks: an experiment file (its resources.<command> over resources.default, "
        "as launch uses them) or a YAML file of those keys (partition, account, qos, constraint, setup, sbatch, "
        "python, ...); the flags below override it where given",
    )
    group.add_argument("--partition", help="SLURM partition")
    group.add_argument("--account", help="SLURM account")
    group.add_argument("--qos", help="SLURM quality of service")
    group.add_argument("--cpus-per-task", type=int, help="CPUs per array task (default: --workers, or 1)")
    group.add_argument("--gpus-per-node", type=int, help="GPUs per array task (predict on GPU nodes; default 0)")
    group.add_argument("--mem-gb", type=float, help="memory per array task (default 16)")
    group.add_argument("--timeout-min", type=int, help=f"time limit per array task (default {defaults.timeout_min})")
    group.add_argument(
        "--max-requeue",
        type=int,
        help=f"requeues after a timeout or preemption, each resuming where the task stopped (default "
        f"{defaults.max_requeue})",
    )
    group.add_argument(
        "--python",
        help="the tasks' Python: a path or a command, e.g. 'apptainer exec image.sif python' (default: this one)",
    )


def cluster_resources(args: argparse.Namespace, kind: str) -> Resources:
    """One task per array element: the array's defaults, under --resources FILE's block for `kind` (shard or
    predict), under the flags given."""
    from hpcdistill.experiment.experiment_file import resources_block, resources_from_mapping

    workers = max(1, getattr(args, "workers", 1))
    merged: dict[str, Any] = {**ARRAY_DEFAULTS, "cpus_per_task": workers}
    if args.resources:
        merged.update(resources_block(args.resources, kind))
    flags = ("partition", "account", "qos", "cpus_per_task", "gpus_per_node", "mem_gb", "timeout_min", "max_requeue")
    merged.update({k: getattr(args, k) for k in (*flags, "python") if getattr(args, k) is not None})
    merged.update(nodes=1, tasks_per_node=1)  # an array task is one process; its slides are its share
    merged.setdefault("signal_delay_s", min(120, int(merged["timeout_min"]) * 60 // 2))
    return resources_from_mapping(merged, f"{args.resources}: resources.{kind}." if args.resources else "--")


def run_array(name: str, out: str | Path, jobs: list[Any], args: argparse.Namespace) -> dict[str, Any] | None:
    """Launch `jobs` (an array and its merge) with its record in `out`/launch.json; None after a dry run or a
    submission not waited for, else the launch record."""
    from hpcdistill.cluster.submit import launch_graph

    command = "hpcdistill " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = launch_graph(
        name,
        Path(out),
        jobs,
        args.cluster,
        dry_run=args.dry_run,
        wait=args.wait or args.cluster != "slurm",
        source=command,
    )
    if args.dry_run:
        return None
    if args.cluster == "slurm" and not args.wait:
        ids = ", ".join(f"{job['key']} {job['slurm_id']}" for job in record["jobs"])
        print(f"submitted {ids}; follow it with: hpcdistill status {out}")
        return None
    return record
