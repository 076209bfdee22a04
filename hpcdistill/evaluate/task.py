"""`EvaluateTask`, an experiment's last job: score every trained run's export, then write the report."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hpcdistill.cluster.resubmitting import Resubmitting
from hpcdistill.evaluate.options import EvalOptions


class EvaluateTask(Resubmitting):
    """Evaluate every trained run's best.pt, then write the report from all evaluation records."""

    def __init__(self, runs: list[dict[str, Any]], shards: str, options: EvalOptions, report_dir: str) -> None:
        self.runs = runs  # {"run_dir", "method", "study"}
        self.shards = shards
        self.options = options  # the same for every run but its method and study
        self.report_dir = report_dir

    def run(self) -> dict[str, Any]:
        from hpcdistill.evaluate.evaluation import evaluate_checkpoint
        from hpcdistill.evaluate.report import load_results, write_report

        for run in self.runs:
            options = dataclasses.replace(self.options, method=run["method"], study=run["study"])
            evaluate_checkpoint(Path(run["run_dir"]) / "best.pt", self.shards, options)
        run_dirs = [run["run_dir"] for run in self.runs]
        report = write_report(load_results(run_dirs), self.report_dir)  # idempotent: a requeue redoes it whole
        return {"report": str(report), "evaluated": run_dirs}
