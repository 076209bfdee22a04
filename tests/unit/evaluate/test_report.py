"""The report renders the paper's layouts from canned evaluation records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.evaluate.ordering import ordering_check
from hpcdistill.evaluate.report import format_ci, load_results, write_report
from hpcdistill.scoring.metrics import METRICS


def _record(tmp_path, name, method, mag, acc, gflops, study="main"):
    run = tmp_path / name / "eval"
    run.mkdir(parents=True)
    metrics = {m: [acc, acc - 0.02, acc + 0.02] for m in METRICS}
    record = {
        "method": method,
        "mag": mag,
        "dataset": "celiac",
        "metrics": metrics,
        "gflops": {"median": gflops, "mean": gflops, "fixed": gflops},
        "study": study,
    }
    (run / "test.json").write_text(json.dumps(record))
    return tmp_path / name


def series_pixels(png, series: int) -> int:
    """How many pixels of the figure are exactly the colour of matplotlib's series `series` (C0, C1, ...)."""
    from matplotlib import colors

    rgb = np.array([round(255 * c) for c in colors.to_rgb(f"C{series}")], np.uint8)
    with Image.open(png) as img:
        pixels = np.asarray(img.convert("RGB"))
    return int((pixels == rgb).all(axis=-1).sum())


def test_format_ci_matches_paper_layout():
    assert format_ci((0.8706, 0.8565, 0.8848)) == "87.06 (85.65-88.48)"


def test_report_tables_bold_best_and_figure(tmp_path):
    runs = [
        _record(tmp_path, "teacher", "Teacher", 10, 0.90, 8.0),
        _record(tmp_path, "base25", "Baseline", 2.5, 0.70, 0.5),
        _record(tmp_path, "kd25", "KD", 2.5, 0.80, 0.5),
        _record(tmp_path, "kdaux25", "KD (aux1)", 2.5, 0.85, 0.5),
        _record(tmp_path, "base125", "Baseline", 1.25, 0.75, 0.125),
        _record(tmp_path, "kd125", "KD", 1.25, 0.72, 0.125),
        _record(tmp_path, "abl", "KD+MP", 2.5, 0.79, 0.5, study="ablation"),
    ]
    results = load_results(runs)
    assert len(results) == 7
    path = write_report(results, tmp_path / "report")
    text = path.read_text()
    assert "90.00 (88.00-92.00)" in text  # the teacher's Table 3 cell
    assert "**85.00 (83.00-87.00)**" in text  # best accuracy at 2.5x is bold
    assert "**70.00" not in text  # a worse cell is not bold
    assert "mag = 2.5x" in text and "mag = 1.25x" in text
    assert "Pixel-loss ablation" in text
    # each method is drawn in its own colour of matplotlib's cycle (markers, bars, legend), and no other series
    figure3 = [series_pixels(tmp_path / "report" / "figure3.png", i) for i in range(5)]
    assert all(n > 20 for n in figure3[:4]) and figure3[4] == 0, figure3  # Teacher, Baseline, KD, KD (aux1)
    ablation = [series_pixels(tmp_path / "report" / "ablation.png", i) for i in range(2)]
    assert ablation[0] > 20 and ablation[1] == 0, ablation  # KD+MP only
    checks = ordering_check(results)  # no paired comparisons: each link judged from the two marginal CIs
    assert any("2.5x: the paper's ordering holds" in c for c in checks)
    assert any(
        "1.25x: the paper's ordering not resolved" in c and "KD > Baseline: not resolved (CIs overlap)" in c
        for c in checks
    )
    assert "Balanced accuracy" in text and "OvR accuracy (paper)" in text and "55.6% for three" in text
    assert text.index("| Balanced accuracy |") < text.index("| Top-1 accuracy |") < text.index("| OvR accuracy")


def test_the_ordering_is_judged_from_the_paired_cis_never_from_points_alone():
    """KD above the baseline in points but with a paired CI crossing 0 is "not resolved"; a paired CI above 0
    resolves it ("holds"), one below 0 contradicts it, whatever the marginal CIs."""
    from hpcdistill.evaluate.comparisons import Comparison
    from hpcdistill.evaluate.report import EvalResult

    def result(method, acc):
        return EvalResult(method, 2.5, "d", {m: (acc, acc - 0.1, acc + 0.1) for m in METRICS}, 1.0)

    runs = [result("Baseline", 0.70), result("KD", 0.74)]
    for (low, high), verdict in (
        ((-0.01, 0.09), "not resolved"),
        ((0.01, 0.07), "holds"),
        ((-0.08, -0.01), "contradicted"),
    ):
        paired = Comparison(2.5, "KD", "Baseline", 1, {"accuracy": (0.04, low, high, 0.2)})
        (line,) = ordering_check(runs, [paired])
        assert f"the paper's ordering {verdict} " in line, line
        assert f"KD > Baseline: {verdict} (paired 95% CI {100 * low:+.1f} to {100 * high:+.1f})" in line


def test_report_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(HpcdistillError, match="no such run folder"):
        load_results([tmp_path / "missing"])
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(HpcdistillError, match="bad.json: not an evaluation record"):
        load_results([bad])


def test_report_pairs_methods_scored_on_the_same_tissues(tiny_dataset, tiny_teacher, tmp_path):
    """Two real evaluations of one model under two method names: the paired difference is exactly 0 with a zero
    CI; runs scored on different samples are refused, not paired."""
    from hpcdistill.evaluate.evaluation import evaluate_checkpoint
    from hpcdistill.evaluate.options import EvalOptions

    for method, run in (("Baseline", "a"), ("KD", "b")):
        evaluate_checkpoint(
            tiny_teacher,
            tiny_dataset["shards"],
            EvalOptions(split="test", method=method, iterations=200, out=str(tmp_path / run / "eval")),
        )
    report = write_report(load_results([tmp_path / "a", tmp_path / "b"]), tmp_path / "report").read_text()
    assert "| 10x | KD − Baseline | 1 | +0.00 (+0.00 to +0.00) | +0.00 (+0.00 to +0.00) | 1.000 | no |" in report
    evaluate_checkpoint(
        tiny_teacher,
        tiny_dataset["shards"],
        EvalOptions(split="val", method="KD", iterations=200, out=str(tmp_path / "c" / "eval")),
    )
    with pytest.raises(HpcdistillError, match="not scored on the same samples"):
        write_report(load_results([tmp_path / "a", tmp_path / "c"]), tmp_path / "report2")


def test_each_teacher_sits_beside_its_students_and_a_failed_teacher_is_named(tmp_path):
    runs = [("teacher-s0", "Teacher", 10, 0.97, 0), ("teacher-s1", "Teacher", 10, 0.62, 1)]
    runs += [(f"baseline-s{s}", "Baseline", 2.5, 0.80, s) for s in (0, 1)]
    runs += [("kd-s0", "KD", 2.5, 0.90, 0), ("kd-s1", "KD", 2.5, 0.60, 1)]
    for name, method, mag, acc, seed in runs:
        folder = _record(tmp_path, name, method, mag, acc, 1.0)
        record = json.loads((folder / "eval" / "test.json").read_text())
        record |= {"seed": seed, "val": {"accuracy": acc + 0.01}}
        (folder / "eval" / "test.json").write_text(json.dumps(record))
    results = load_results([tmp_path / name for name, *_ in runs])
    text = (write_report(results, tmp_path / "report")).read_text()
    assert "| Seed | Teacher val | Teacher test | Baseline 2.5x test | KD 2.5x test |" in text
    assert "| 0 | 98.0 | 97.0 | 80.0 | 90.0 |" in text and "| 1 | 63.0 | 62.0 | 80.0 | 60.0 |" in text
    (line,) = ordering_check(results)
    assert (
        "ordering contradicted" in line
        and "The ordering fails because the teacher failed: teacher s1 (val 63.0%, " in line
    )
    assert "teacher s0" not in line.split("teacher failed:")[1]  # the good teacher is not blamed
