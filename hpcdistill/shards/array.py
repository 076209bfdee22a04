"""Sharding as an array of tasks (SLURM, or local processes). The plan is made once, before any task starts: splits,
class ids and which task cuts which slide (balanced by level-0 tissue area from a `--dry-run`'s plan.json, else by
file size). Each task writes its own `{split}-tNNN-NNNNNN.tar` files, journal and partial manifest under
`tasks/tNNN/`, and resumes from its journal when requeued; the merge job writes the one manifest.json from the
per-slide records, whose statistics are sums, so it equals a single-process run's (shard names aside)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from hpcdistill.cluster.job_plan import JobPlan, Resources
from hpcdistill.cluster.resubmitting import Resubmitting
from hpcdistill.cluster.task_array import TASKS, array_and_merge, balance, task_dir, task_name
from hpcdistill.common.errors import ShardingError
from hpcdistill.common.files import atomic_write_bytes
from hpcdistill.common.output_folder import check_links
from hpcdistill.common.progress import write_progress
from hpcdistill.shards.cut import SPOOL
from hpcdistill.shards.manifest import MANIFEST, build_manifest, default_dataset_name
from hpcdistill.shards.plan import ShardParams, SlideJob, make_plan, params_fingerprint, shard_inputs
from hpcdistill.shards.writer import (
    JOURNAL,
    PART,
    ShardWriter,
    check_journalled,
    clear_output,
    create_output_folder,
    read_matching,
    remove_partial_files,
)
from hpcdistill.slides.catalog import collect_slides


def slide_weights(jobs: list[SlideJob], out: Path) -> tuple[list[float], str]:
    """What cutting each slide costs: its level-0 tissue area from `out`/plan.json (written by `shard --dry-run`
    with the same slides) when that covers every slide, else its file size."""
    try:
        rows = json.loads((out / "plan.json").read_text())["slides"]
        areas = {row["slide"]: float(row.get("tissue_area", 0.0)) for row in rows}  # a skipped slide costs ~0
    except (OSError, ValueError, KeyError, TypeError):
        areas = {}
    if all(job.slide in areas or job.skip_reason for job in jobs):
        return [areas.get(job.slide, 0.0) for job in jobs], "level-0 tissue area (plan.json)"
    return [float(os.path.getsize(job.path)) for job in jobs], "file size"


@dataclass
class TaskShare:
    """What one array task needs: its own slides, not the whole plan (submitit pickles one per task)."""

    out: str
    params: ShardParams
    fingerprint: dict[str, Any]
    tasks: int
    index: int
    jobs: list[SlideJob]

    @property
    def task_fingerprint(self) -> dict[str, Any]:
        """A task's journal and partial manifest must match the run's parameters and its own share of the slides."""
        return {
            **self.fingerprint,
            "task": self.index,
            "tasks": self.tasks,
            "task_slides": [job.slide for job in self.jobs],
        }


@dataclass
class ShardArrayPlan:
    """Everything the tasks and the merge need, fixed before submission (pickled into each job by submitit)."""

    out: str
    params: ShardParams
    fingerprint: dict[str, Any]
    classes: list[str]
    jobs: list[SlideJob]
    assignment: list[list[int]]  # job indices per task, in plan order
    weights: list[float]
    basis: str  # what the weights are
    name: str = ""  # the dataset's name in reports (shard --name; "": the folder's)

    @property
    def tasks(self) -> int:
        return len(self.assignment)

    def share(self, index: int) -> TaskShare:
        return TaskShare(
            self.out, self.params, self.fingerprint, self.tasks, index, [self.jobs[i] for i in self.assignment[index]]
        )

    def task_fingerprint(self, index: int) -> dict[str, Any]:
        return self.share(index).task_fingerprint

    def finished(self, index: int) -> bool:
        return read_matching(task_dir(self.out, index) / PART, self.task_fingerprint(index)) is not None

    def complete(self) -> bool:
        """The folder already holds this run's manifest (nothing to do); one of other parameters is refused."""
        return read_matching(Path(self.out) / MANIFEST, self.fingerprint) is not None

    def unfinished(self) -> list[int]:
        return [i for i in range(self.tasks) if not self.finished(i)]


def plan_array(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    labels_csv: str | None,
    params: ShardParams,
    tasks: int,
    overwrite: bool = False,
    name: str = "",
) -> ShardArrayPlan:
    """The plan of an array run into `out`. Refuses a folder holding a single-process run in progress, or an array
    run with another task count or assignment (rerun it the same way, or --overwrite)."""
    out = Path(out).resolve()  # tasks may start in another working directory
    slide_paths = collect_slides(inputs)
    jobs, classes = make_plan(slide_paths, labels_csv, params)
    if not 1 <= tasks <= len(jobs):
        raise ShardingError(f"--tasks {tasks}: must be between 1 and the number of slides ({len(jobs)})")
    create_output_folder(out)
    check_links(out, ["qc", TASKS])  # the tasks write there: never through a link out of --out
    if overwrite:
        clear_output(out, shard_inputs(slide_paths, labels_csv, params))
    if (out / JOURNAL).exists():
        raise ShardingError(
            f"{out}: holds a single-process run in progress ({JOURNAL}); rerun it without --cluster, or use --overwrite"
        )
    weights, basis = slide_weights(jobs, out)
    fingerprint = params_fingerprint(params, slide_paths, labels_csv)
    plan = ShardArrayPlan(str(out), params, fingerprint, classes, jobs, balance(weights, tasks), weights, basis, name)
    for stale in sorted((out / TASKS).glob("t[0-9][0-9][0-9]")) if (out / TASKS).is_dir() else []:
        index = int(stale.name[1:])
        for name in (PART, JOURNAL):
            if index >= tasks or not (stale / name).exists():
                continue
            try:
                read_matching(stale / name, plan.task_fingerprint(index))
            except ShardingError:
                raise ShardingError(
                    f"{out}: holds an array run with another --tasks or other slides ({stale}); "
                    "rerun it the same way, or use --overwrite"
                ) from None
    return plan


def describe_plan(plan: ShardArrayPlan) -> str:
    """`--dry-run`: slides, weight and expected samples per task (samples from plan.json when it has them)."""
    try:
        rows = json.loads((Path(plan.out) / "plan.json").read_text())["slides"]
        samples = {row["slide"]: row.get("samples", 0) for row in rows}
    except (OSError, ValueError, KeyError, TypeError):
        samples = {}
    lines = [
        f"# {plan.tasks} tasks over {len(plan.jobs)} slides, balanced by {plan.basis}",
        f"{'task':<6} {'slides':>6} {'weight':>14} {'samples':>8}  first slides",
    ]
    for index, indices in enumerate(plan.assignment):
        expected = [samples.get(plan.jobs[i].slide) for i in indices]
        total = str(sum(expected)) if expected and None not in expected else "?"
        names = ", ".join(plan.jobs[i].slide for i in indices[:3]) + (" ..." if len(indices) > 3 else "")
        lines.append(
            f"{task_name(index):<6} {len(indices):>6} {sum(plan.weights[i] for i in indices):>14.4g} "
            f"{total:>8}  {names}"
        )
    return "\n".join(lines)


def run_task(share: TaskShare, workers: int) -> dict[str, Any]:
    """Cut one task's slides into its own shards, resuming from its journal; writes its partial manifest."""
    from hpcdistill.shards.sharding import write_slides

    index, out, jobs = share.index, Path(share.out), share.jobs
    folder, fingerprint = task_dir(out, index), share.task_fingerprint
    folder.mkdir(parents=True, exist_ok=True)
    if read_matching(folder / PART, fingerprint) is None:
        tag = f"{task_name(index)}-"
        spool = folder / SPOOL

        def clean_up() -> None:
            remove_partial_files(out, spool, tag, [job.slide for job in jobs])

        def report(done: int, total: int) -> None:
            write_progress(
                folder,
                {
                    "mode": "shard",
                    "phase": "shard" if done < total else "done",
                    "unit": "slide",
                    "step": done,
                    "steps": total,
                    "updated": time.time(),
                },
            )

        clean_up()
        journal = read_matching(folder / JOURNAL, fingerprint)
        writer = ShardWriter(
            out, share.params, fingerprint, journal and check_journalled(out, journal), folder / JOURNAL, tag
        )
        write_slides(out, writer, jobs, share.params, workers, False, spool, clean_up, report)
        part = {"params": fingerprint, "slides": writer.journal["slides"], "shards": writer.journal["shards"]}
        atomic_write_bytes(folder / PART, json.dumps(part, sort_keys=True).encode("utf-8"))
        (folder / JOURNAL).unlink(missing_ok=True)
    return {"task": index, "slides": len(jobs)}


def merge_parts(plan: ShardArrayPlan, strict: bool) -> dict[str, Any]:
    """The one manifest.json from every task's partial manifest; refuses while a task has not finished."""
    from hpcdistill.shards.sharding import check_skipped

    out = Path(plan.out)
    records: dict[str, dict] = {}
    shards: dict[str, dict] = {}
    for index in range(plan.tasks):
        part = read_matching(task_dir(out, index) / PART, plan.task_fingerprint(index))
        if part is None:
            raise ShardingError(
                f"{task_dir(out, index)}: task {index} has not finished (no {PART}); rerun the same "
                "command: only unfinished tasks run again"
            )
        records.update(check_journalled(out, part)["slides"])
        shards.update(part["shards"])
    missing = [job.slide for job in plan.jobs if job.slide not in records]
    if missing:
        raise ShardingError(f"{out}: the tasks' records lack {len(missing)} slide(s) (first: {missing[0]})")
    name = plan.name or default_dataset_name(out)
    manifest = build_manifest(plan.params, plan.fingerprint, plan.classes, plan.jobs, records, shards, name)
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode())
    check_skipped(out, manifest, strict)
    return {"manifest": str(out / MANIFEST), "samples": {k: v["samples"] for k, v in manifest["splits"].items()}}


class ShardTask(Resubmitting):
    """One array task of a sharding run; a requeued task resumes from its own journal."""

    def __init__(self, share: TaskShare, workers: int = 1) -> None:
        self.share, self.workers = share, workers

    def run(self) -> dict[str, Any]:
        return run_task(self.share, self.workers)


class MergeTask(Resubmitting):
    """The merge job after the array (idempotent: a requeue reruns it whole)."""

    def __init__(self, plan: ShardArrayPlan, strict: bool = False) -> None:
        self.plan, self.strict = plan, strict

    def run(self) -> dict[str, Any]:
        return merge_parts(self.plan, self.strict)


def shard_jobs(plan: ShardArrayPlan, resources: Resources, workers: int, strict: bool) -> list[JobPlan]:
    """A sharding run's array over its unfinished tasks and the merge after it; [] when the folder is complete."""
    if plan.complete():
        return []
    no_gpu = dataclasses.replace(resources, gpus_per_node=0)
    return array_and_merge(
        "shard",
        "Shard",
        plan.out,
        plan.unfinished(),
        lambda i: ShardTask(plan.share(i), workers),
        MergeTask(plan, strict),
        no_gpu,
    )
