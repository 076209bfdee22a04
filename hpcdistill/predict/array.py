"""Prediction as an array of tasks (SLURM, or local processes): the slides balanced by file size over the tasks, each
task's results kept under `tasks/tNNN/` (overlays go straight to the shared `overlays/`), and the merge job that
writes tissues.csv, slides.csv and predictions.json in slide order, exactly as a single process would."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcdistill.cluster.job_plan import JobPlan, Resources
from hpcdistill.cluster.resubmitting import Resubmitting
from hpcdistill.cluster.task_array import array_and_merge, balance, task_dir, task_name
from hpcdistill.common.errors import PredictionError
from hpcdistill.common.files import atomic_write_bytes
from hpcdistill.common.progress import write_progress
from hpcdistill.common.provenance import provenance
from hpcdistill.slides.catalog import check_slide_ids

PART = "predictions.part.json"


@dataclass
class PredictShare:
    """One task's slides and the settings they are classified with (submitit pickles one per task)."""

    model: str
    slides: list[str]
    out: str
    index: int
    tasks: int
    options: Any  # predict.PredictOptions
    device: str = "auto"

    def fingerprint(self) -> dict[str, Any]:
        """What a task's results must have been computed for, to be reused by a rerun."""
        return {
            "model": self.model,
            "model_mtime": os.path.getmtime(self.model),
            "task": self.index,
            "tasks": self.tasks,
            "slides": self.slides,
            "options": dataclasses.asdict(self.options),
        }

    def finished(self) -> dict[str, Any] | None:
        try:
            part = json.loads((task_dir(self.out, self.index) / PART).read_text())
        except (OSError, ValueError):
            return None
        return part if part.get("fingerprint") == self.fingerprint() else None


@dataclass
class PredictArrayPlan:
    model: str
    slides: list[str]  # in output order
    out: str
    assignment: list[list[int]]  # slide indices per task
    options: Any  # predict.PredictOptions
    device: str = "auto"

    @property
    def tasks(self) -> int:
        return len(self.assignment)

    def share(self, index: int) -> PredictShare:
        return PredictShare(
            self.model,
            [self.slides[i] for i in self.assignment[index]],
            self.out,
            index,
            self.tasks,
            self.options,
            self.device,
        )

    def finished(self, index: int) -> dict[str, Any] | None:
        return self.share(index).finished()


def plan_predictions(
    model: str | Path, slides: list[str | Path], out: str | Path, tasks: int, options: Any, device: str = "auto"
) -> PredictArrayPlan:
    if not 1 <= tasks <= len(slides):
        raise PredictionError(f"--tasks {tasks}: must be between 1 and the number of slides ({len(slides)})")
    model = Path(model).resolve()
    if not model.is_file():
        raise PredictionError(f"{model}: no such checkpoint file")
    paths = [str(Path(s).resolve()) for s in slides]
    check_slide_ids(paths)
    weights = [float(os.path.getsize(p)) for p in paths]
    return PredictArrayPlan(str(model), paths, str(Path(out).resolve()), balance(weights, tasks), options, device)


def run_prediction_task(share: PredictShare) -> dict[str, Any]:
    """Classify one task's slides; its results are kept for the merge (a rerun reuses finished tasks)."""
    from hpcdistill.models.export import load_exported
    from hpcdistill.models.inference import pick_device
    from hpcdistill.predict.prediction import classify_slides, summarise

    folder = task_dir(share.out, share.index)
    if share.finished() is None:
        folder.mkdir(parents=True, exist_ok=True)
        exported = load_exported(share.model)
        exported.model.to(pick_device(share.device))
        count = len(share.slides)
        write_progress(
            folder,
            {"mode": "predict", "phase": "predict", "unit": "slide", "step": 0, "steps": count, "updated": time.time()},
        )
        results = classify_slides(exported, share.slides, Path(share.out), share.options, progress=False)
        part = {
            "fingerprint": share.fingerprint(),
            "summary": summarise(share.model, exported, share.options),
            "results": results,
        }
        atomic_write_bytes(folder / PART, json.dumps(part).encode("utf-8"))
        write_progress(
            folder,
            {
                "mode": "predict",
                "phase": "done",
                "unit": "slide",
                "step": count,
                "steps": count,
                "updated": time.time(),
            },
        )
    return {"task": share.index, "slides": len(share.slides)}


def merge_predictions(plan: PredictArrayPlan) -> dict[str, Any]:
    """The tasks' results in slide order, written as one single-process prediction would write them."""
    from hpcdistill.predict.result_files import write_predictions

    by_slide: dict[str, dict] = {}
    summary: dict[str, Any] = {}
    for index in range(plan.tasks):
        part = plan.finished(index)
        if part is None:
            raise PredictionError(
                f"{task_dir(plan.out, index)}: task {task_name(index)} has not finished; rerun the "
                "same command: only unfinished tasks run again"
            )
        summary = part["summary"]
        by_slide.update({r["path"]: r for r in part["results"]})
    results = [by_slide[slide] for slide in plan.slides]
    summary["model"] = plan.model
    summary["provenance"] = provenance()  # the merge wrote predictions.json; each task's part keeps its own
    cohort = None
    if plan.options.labels:  # torch-free planning; the labels are read, and the calls scored, here
        from hpcdistill.predict.cohort_scores import cohort_labels

        cohort = cohort_labels(plan.options.labels, results, summary["classes"])
    write_predictions(Path(plan.out), summary, results, cohort)
    if cohort is not None:
        from hpcdistill.predict.cohort_scores import score_prediction

        score_prediction(Path(plan.out), results, summary, plan.options, cohort)
    return {"slides": len(results), "ok": sum(r["status"] == "ok" for r in results)}


class PredictTask(Resubmitting):
    """One array task of a prediction run (a requeue redoes its slides: the results are written at the end)."""

    def __init__(self, share: PredictShare) -> None:
        self.share = share

    def run(self) -> dict[str, Any]:
        return run_prediction_task(self.share)


class MergePredictionsTask(Resubmitting):
    def __init__(self, plan: PredictArrayPlan) -> None:
        self.plan = plan

    def run(self) -> dict[str, Any]:
        return merge_predictions(self.plan)


def predict_jobs(plan: PredictArrayPlan, resources: Resources) -> list[JobPlan]:
    """A prediction run's array over its unfinished tasks and the merge after it."""
    todo = [i for i in range(plan.tasks) if plan.finished(i) is None]
    return array_and_merge(
        "predict",
        "Predict",
        plan.out,
        todo,
        lambda i: PredictTask(plan.share(i)),
        MergePredictionsTask(plan),
        resources,
    )
