"""`EvaluateTask`, an experiment's last job: score every trained run's export, then write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcdistill.cluster.resubmitting import Resubmitting


class EvaluateTask(Resubmitting):
    """Evaluate every trained run's best.pt, then write the report from all evaluation records."""

    def __init__(
        self,
        runs: list[dict[str, Any]],
        shards: str,
        split: str,
        iterations: int,
        report_dir: str,
        workers: int = 0,
        units: tuple[str, ...] = ("tissue",),
        slide_rule: str = "mean",
    ) -> None:
        self.runs = runs  # {"run_dir", "method", "study"}
        self.units, self.slide_rule = tuple(units), slide_rule
        self.shards = shards
        self.split = split
        self.iterations = iterations
        self.report_dir = report_dir
        self.workers = workers

    def run(self) -> dict[str, Any]:
        from hpcdistill.evaluate.evaluation import evaluate_checkpoint
        from hpcdistill.evaluate.report import load_results, write_report

        for run in self.runs:
            evaluate_checkpoint(
                Path(run["run_dir"]) / "best.pt",
                self.shards,
                self.split,
                method=run["method"],
                study=run["study"],
                iterations=self.iterations,
                workers=self.workers,
                units=self.units,
                slide_rule=self.slide_rule,
            )
        run_dirs = [run["run_dir"] for run in self.runs]
        report = write_report(load_results(run_dirs), self.report_dir)  # idempotent: a requeue redoes it whole
        return {"report": str(report), "evaluated": run_dirs}
