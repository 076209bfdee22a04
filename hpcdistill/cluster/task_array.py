"""An array of tasks over a list of items (sharding's slides, prediction's slides) and the merge job after it: the
items balanced over the tasks by weight, each task's folder under `<out>/tasks/tNNN/`, and the two jobs of the
graph. A task counts as finished only when its part file records the fingerprint of the run it belongs to."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from hpcdistill.cluster.job_plan import JobPlan, Resources, TaskPlan

TASKS = "tasks"  # an array run's per-task folders: journal, partial results, progress, spool


def task_name(index: int) -> str:
    return f"t{index:03d}"


def task_dir(out: str | Path, index: int) -> Path:
    return Path(out) / TASKS / task_name(index)


def balance(weights: list[float], tasks: int) -> list[list[int]]:
    """Indices per task, heaviest first to the lightest task so far (ties: the lower task); deterministic."""
    loads, assignment = [0.0] * tasks, [[] for _ in range(tasks)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        task = min(range(tasks), key=lambda t: (loads[t], t))
        loads[task] += weights[i]
        assignment[task].append(i)
    return [sorted(indices) for indices in assignment]


def array_and_merge(
    kind: str,
    label: str,
    out: str,
    todo: list[int],
    task_callable: Callable[[int], Any],
    merge_callable: Any,
    resources: Resources,
) -> list[JobPlan]:
    """The array over the unfinished task indices `todo` (none when all are done) and the merge after it; every
    task is one process on one node, the merge one CPU and no GPU."""
    one = dataclasses.replace(resources, nodes=1, tasks_per_node=1)
    tasks = [TaskPlan(f"{kind}-{task_name(i)}", None, str(task_dir(out, i)), "", []) for i in todo]
    array = JobPlan(kind, kind, one, tasks, label=label, callables=[task_callable(i) for i in todo])
    merge = JobPlan(
        "merge",
        "merge",
        dataclasses.replace(one, cpus_per_task=1, gpus_per_node=0),
        [TaskPlan("merge", None, out, "", [])],
        after_ok=[kind] if todo else [],
        label="Merge",
        callables=[merge_callable],
    )
    return ([array] if todo else []) + [merge]
