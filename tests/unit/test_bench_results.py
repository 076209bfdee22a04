"""The prediction benchmark is rerun by any change to what it measures: bench/results_predict.md names the commit it
measured, and no later commit may change `predict/`, `slides/` or `models/` without measuring again
(`bench/bench_predict.py`). Not a speed test: nothing here is timed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MEASURED = ("hpcdistill/predict", "hpcdistill/slides", "hpcdistill/models")


def git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def test_the_prediction_benchmark_measured_the_current_code():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the benchmark's commit cannot be checked")
    if git("rev-parse", "--is-shallow-repository") == "true":
        pytest.skip("a shallow clone: the benchmark's commit may not be in it")
    text = (REPO / "bench" / "results_predict.md").read_text()
    found = re.search(r"; commit ([0-9a-f]{7,40})( \(with uncommitted changes\))?", text)
    assert found, "bench/results_predict.md names no commit: rerun bench/bench_predict.py"
    assert not found.group(2), "the benchmark measured uncommitted code: commit, then rerun it"
    measured = found.group(1)
    try:
        git("merge-base", "--is-ancestor", measured, "HEAD")
    except subprocess.CalledProcessError:
        pytest.fail(f"bench/results_predict.md measured {measured}, which is not in this history: rerun it")
    changed = git("log", "--format=%h %s", f"{measured}..HEAD", "--", *MEASURED)
    assert not changed, f"changed since the benchmark ran ({measured}); rerun bench/bench_predict.py:\n{changed}"
