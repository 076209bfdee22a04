"""The prediction benchmark's quick mode runs beside the tests, so the command that catches a slipped ratio cannot rot
unnoticed. Not a speed test: it checks that every configuration was measured, never how fast."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [f"{m} {r} default" for m in ("teacher 10x", "student 2.5x", "student 1.25x") for r in ("level0", "pyramid")]


@pytest.mark.slow
def test_the_quick_prediction_benchmark_measures_every_configuration(tmp_path):
    results = (REPO / "bench" / "results_predict.md").read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VIPS_CONCURRENCY": "1"}
    command = [sys.executable, "bench/bench_predict.py", "--quick", "--cache", str(tmp_path / "cache")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ratios = dict(re.findall(r"^(.+ default): ([0-9.]+)x the teacher reading level 0$", done.stdout, re.MULTILINE))
    assert sorted(ratios) == sorted(CONFIGS), done.stdout
    assert float(ratios["teacher 10x level0 default"]) == 1.0  # the unit every other row is measured in
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in ratios.values()), ratios
    assert (REPO / "bench" / "results_predict.md").read_text() == results, "the quick mode wrote the results file"
