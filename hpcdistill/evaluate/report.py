"""The paper's reporting: Table 3 (teacher), Table 4 (methods x magnifications), Figure 3 (accuracy vs GFLOPs).

Inputs are the evaluation records that `hpcdistill evaluate` writes (`<run>/eval/<split>.json`). Each record names
its method ("Teacher", "Baseline", "KD", "KD (ADv1)", or an ablation variant "KD+MP" ...), magnification, dataset,
metrics as (point, low, high) fractions and GFLOPs per forward pass. Everything here is a pure function of those
records, so the report can be rebuilt at any time from finished runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcdistill.common.errors import EvaluationError
from hpcdistill.common.files import atomic_output, atomic_write_text, read_json
from hpcdistill.common.mags import mag_name
from hpcdistill.evaluate.comparisons import Comparison, format_difference, paired_comparisons
from hpcdistill.evaluate.ordering import by_run, ordering_check
from hpcdistill.evaluate.report_provenance import provenance_section
from hpcdistill.evaluate.report_teachers import teachers_table
from hpcdistill.evaluate.report_units import absent_lines, class_section, unit_section, warning_lines
from hpcdistill.scoring.method_labels import ABLATION_ORDER, TEACHER, method_order
from hpcdistill.scoring.metrics import METRIC_TITLES, METRICS


@dataclass(frozen=True)
class EvalResult:
    """One evaluated run: what the report needs of `<run>/eval/<split>.json`."""

    method: str
    mag: float
    dataset: str
    metrics: dict  # metric -> (point, low, high), fractions
    gflops: float  # FLOPs (not MACs) / 1e9 per forward pass at the dataset's median tissue size
    study: str = "main"  # "main" (Table 4) or "ablation" (pixel-loss resize ablation)
    source: str = ""
    ci: tuple[float, int] = (0.95, 10000)  # the bootstrap's (level, resamples)
    classes: tuple[str, ...] = ()
    seed: int | None = None  # the training seed (run.seed)
    resample: str = "samples"  # what the bootstrap resampled: samples or slides
    predictions: str = ""  # the per-sample predictions CSV beside the record (paired comparisons read it)
    units: dict = field(default_factory=dict, compare=False)  # unit -> its scores (evaluate.unit_scores), as recorded
    val_accuracy: float | None = None  # the export's validation accuracy at its pick (None: not recorded)
    kappa_weights: str = "unweighted"  # Cohen's kappa: quadratic where the run's classes are an ordered scale
    provenance: dict = field(default_factory=dict, compare=False)  # how the evaluation was made ({}: older record)
    model_provenance: dict = field(default_factory=dict, compare=False)  # how the model was


def load_results(paths: list[str | Path]) -> list[EvalResult]:
    """Read evaluation records from run folders (every `eval/*.json` inside) or from JSON files."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.glob("eval/*.json")) or sorted(path.glob("*/eval/*.json"))
            if not found:
                raise EvaluationError(f"{path}: no eval/*.json inside; run `hpcdistill evaluate` on it first")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise EvaluationError(f"{path}: no such run folder or evaluation file")
    return [_read_result(f) for f in files]


def _read_result(path: Path) -> EvalResult:
    try:
        record = read_json(path)  # a regular file, within the byte and depth limits
        missing = [m for m in METRICS if m not in record["metrics"]]
        if missing:
            raise EvaluationError(
                f"{path}: written by an older version, without {', '.join(missing)}; evaluate the export again "
                "(hpcdistill evaluate, or relaunch the experiment: its evaluation job redoes every record)"
            )
        metrics = {m: tuple(float(v) for v in record["metrics"][m]) for m in METRICS}
        return EvalResult(
            method=str(record["method"]),
            mag=float(record["mag"]),
            dataset=str(record.get("dataset", "")),
            metrics=metrics,
            gflops=float(record["gflops"]["median"]),
            study=str(record.get("study", "main")),
            source=str(path),
            ci=(
                float(record.get("bootstrap", {}).get("level", 0.95)),
                int(record.get("bootstrap", {}).get("iterations", 10000)),
            ),
            classes=tuple(record.get("classes", ())),
            seed=record.get("seed"),
            resample=str(record.get("bootstrap", {}).get("resample", "samples")),
            predictions=str(path.with_name(f"{record.get('split', path.stem)}_predictions.csv")),
            units=dict(record.get("units") or {}),
            val_accuracy=(record.get("val") or {}).get("accuracy"),
            kappa_weights=str(record.get("kappa_weights", "unweighted")),
            provenance=dict(record.get("provenance") or {}),
            model_provenance=dict(record.get("model_provenance") or {}),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EvaluationError(f"{path}: not an evaluation record ({type(err).__name__}: {err})") from None


def format_ci(value: tuple[float, float, float] | None) -> str:
    """(0.8706, 0.8565, 0.8848) -> '87.06 (85.65-88.48)', the paper's percentage layout; None (a metric that
    cannot be computed, e.g. AUROC with one class) -> 'n/a'."""
    if value is None:
        return "n/a"
    point, low, high = value
    return f"{100 * point:.2f} ({100 * low:.2f}-{100 * high:.2f})"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def teacher_table(results: list[EvalResult]) -> str:
    """Table 3: the teacher's metrics with CIs, one column per dataset."""
    teachers = sorted((r for r in results if r.method == TEACHER), key=lambda r: (r.dataset, r.seed or 0))
    if not teachers:
        return "_No teacher evaluation found._"
    header = ["Metric"] + [
        f"{r.dataset or 'dataset'} ({mag_name(r.mag)})" + (f" s{r.seed}" if len(teachers) > 1 else "") for r in teachers
    ]
    rows = [[METRIC_TITLES[m]] + [format_ci(r.metrics[m]) for r in teachers] for m in METRICS]
    rows.append(["GFLOPs"] + [f"{r.gflops:.3g}" for r in teachers])
    return _markdown_table(header, rows)


def methods_table(
    results: list[EvalResult], methods: list[str] | None = None, metrics: tuple[str, ...] = METRICS
) -> str:
    """Table 4: one block per magnification, one column per method, the best point estimate per row in bold."""
    methods = methods or sorted({r.method for r in results if r.method != TEACHER}, key=method_order)
    by_key = {(r.method, r.mag): r for r in sorted(results, key=lambda r: -(r.seed or 0))}  # the lowest seed
    mags = sorted({r.mag for r in results if r.method in methods})
    if not mags:
        return "_No student or baseline evaluations found._"
    rows: list[list[str]] = []
    for mag in mags:
        rows.append([f"**mag = {mag_name(mag)}**"] + [""] * len(methods))
        for metric in metrics:
            cells = [by_key.get((m, mag)) for m in methods]
            points = [c.metrics[metric][0] for c in cells if c is not None and c.metrics.get(metric)]
            best = max(points) if points else None
            row = [METRIC_TITLES[metric]]
            for cell in cells:
                if cell is None:
                    row.append("—")
                    continue
                value = cell.metrics.get(metric)
                text = format_ci(value)
                row.append(f"**{text}**" if value and value[0] == best else text)
            rows.append(row)
        gflops = [by_key.get((m, mag)) for m in methods]
        rows.append(["GFLOPs"] + [f"{c.gflops:.3g}" if c else "—" for c in gflops])
    return _markdown_table(["Metric"] + methods, rows)


def seeds_table(results: list[EvalResult]) -> str:
    """Per method and magnification: mean ± sd over seeds, and each seed's value (accuracy and F1, %)."""
    rows = []
    for (method, mag, _), runs in sorted(
        by_run(results).items(), key=lambda item: (item[0][1], method_order(item[0][0]))
    ):
        runs = sorted(runs, key=lambda r: (r.seed is None, r.seed))
        cells = []
        for m in ("accuracy", "f1"):
            values = np.array([100 * r.metrics[m][0] for r in runs])
            cells.append(f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}")
        per_seed = ", ".join(f"s{r.seed}: {100 * r.metrics['accuracy'][0]:.2f}" for r in runs)
        rows.append([mag_name(mag), method, str(len(runs)), *cells, per_seed])
    return _markdown_table(["Mag", "Method", "Seeds", "Accuracy mean ± sd", "F1 mean ± sd", "Accuracy per seed"], rows)


def paired_table(comparisons: list[Comparison]) -> str:
    """Each comparison's accuracy and F1 difference with its paired-bootstrap CI and one-sided p-value."""
    if not comparisons:
        return "_No paired comparison (it needs each run's predictions CSV beside its evaluation)._"
    rows = [
        [
            mag_name(c.mag),
            f"{c.a} − {c.b}",
            str(c.seeds),
            format_difference(c.metrics["accuracy"]),
            format_difference(c.metrics["f1"]),
            f"{c.metrics['accuracy'][3]:.3f}",
            "yes" if c.significant else "no",
        ]
        for c in comparisons
    ]
    return _markdown_table(
        [
            "Mag",
            "Comparison",
            "Seeds",
            "Δ OvR accuracy (paper) (95% paired CI)",
            "Δ F1 (95% paired CI)",
            "P(Δ acc ≤ 0)",
            "Significant",
        ],
        rows,
    )


def plot_accuracy_vs_gflops(results: list[EvalResult], path: Path, title: str) -> Path:
    """Figure 3: test accuracy against GFLOPs per forward pass (log x), one series per method. Methods at one
    magnification share a GFLOPs value, so each is drawn slightly offset along x (no point or bar hides another);
    the x ticks are the magnifications' GFLOPs, labelled with both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    methods = sorted({r.method for r in results}, key=method_order)
    for i, method in enumerate(methods):
        points = sorted((r for r in results if r.method == method), key=lambda r: r.gflops)
        shift = 1.035 ** (i - (len(methods) - 1) / 2)  # a few % on a log axis: side by side, still at their compute
        xs = [r.gflops * shift for r in points]
        ys = [100 * r.metrics["accuracy"][0] for r in points]
        lows = [100 * (r.metrics["accuracy"][0] - r.metrics["accuracy"][1]) for r in points]
        highs = [100 * (r.metrics["accuracy"][2] - r.metrics["accuracy"][0]) for r in points]
        style = dict(marker="*", markersize=12, linestyle="none") if method == TEACHER else dict(marker="o")
        ax.errorbar(xs, ys, yerr=[lows, highs], capsize=3, label=method, **style)
    ax.set_xscale("log")
    ticks = sorted({(round(r.gflops, 12), r.mag) for r in results})
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([g for g, _ in ticks], [f"{g:.3g}\n{mag_name(m)}" for g, m in ticks], fontsize=8)
    low, high = ticks[0][0], ticks[-1][0]
    ax.set_xlim(low / 1.4, high * 1.4)
    ax.set_xlabel("GFLOPs per forward pass and magnification (FLOPs, not MACs; log scale)")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: no bar hides behind it
    cis = sorted({r.ci for r in results})
    caption = "; ".join(f"{100 * level:g}% bootstrap CI ({n:,} resamples)" for level, n in cis)
    fig.text(0.01, 0.01, f"bars: {caption}", fontsize=8, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _unit_sections(main: list[EvalResult], out: Path) -> list[str]:
    """Slide and patient tables, per-class rows and confusion matrices, and the classes a split lacks."""
    plot = lambda rs, name, title: plot_accuracy_vs_gflops(rs, out / name, title).name  # noqa: E731
    paired = lambda rs: paired_table(paired_comparisons(rs))  # noqa: E731
    units = ("slide", "patient")
    sections = [line for unit in units for line in unit_section(main, unit, methods_table, plot, paired)]
    chosen = next((u for u in ("slide", "patient", "tissue") if any(u in r.units for r in main)), None)
    sections += class_section(main, chosen) if chosen else []
    absent, warnings = absent_lines(main), warning_lines(main)
    sections += ["## Collapsed models and small cohorts", "\n".join(warnings)] if warnings else []
    return sections + (["## Classes missing from a scored split", "\n".join(absent)] if absent else [])


def _intro(results: list[EvalResult]) -> str:
    """The report's first paragraph: the CIs, what each metric is, and how far the paper's accuracy flatters."""
    return (
        "Percentages with bootstrap CIs ("
        + "; ".join(f"{100 * level:g}%, {n:,} resamples" for level, n in sorted({r.ci for r in results}))
        + "). Balanced accuracy is the mean recall over the classes (chance: 1/K whatever the class mix); top-1 is "
        "the share of calls that are right. The paper's metrics follow: one-vs-rest per class, macro-averaged. Its "
        "OvR accuracy, (TP + TN) / N per class, flatters: a model that calls every tissue one class scores "
        "((K - 1)² + 1) / K² on it with K balanced classes (55.6% for three; balanced accuracy: 33.3%). GFLOPs "
        "are FLOPs (2 per multiply-add) per forward pass at the median tissue size. " + _kappa_sentence(results)
    )


def _kappa_sentence(results: list[EvalResult]) -> str:
    """What Cohen's kappa weighs in these runs (1 = perfect agreement, 0 = chance), and a mix said, not averaged."""
    weights = {r.kappa_weights for r in results}
    if weights == {"quadratic"}:
        scale = " < ".join(results[0].classes)
        return f"Cohen's kappa (×100; 0 = chance) is quadratic-weighted on the ordered classes {scale}."
    if weights == {"unweighted"}:
        return "Cohen's kappa (×100; 0 = chance) is unweighted (no class order declared: data.ordinal_classes)."
    return (
        "Cohen's kappa (×100; 0 = chance) is quadratic-weighted in some runs and unweighted in others: compare it "
        "within one."
    )


def write_report(results: list[EvalResult], out_dir: str | Path) -> Path:
    """Write report.md, figure3.png and (when ablation runs exist) ablation.png into out_dir."""
    if not results:
        raise EvaluationError(f"{out_dir}: no evaluation records to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main = [r for r in results if r.study == "main"]
    comparisons = paired_comparisons([r for r in main if Path(r.predictions).is_file()])
    ablation = [r for r in results if r.study == "ablation"]
    resamples = " / ".join(f"{n:,}" for n in sorted({r.ci[1] for r in main})) or "no"
    sections = [
        "# hpcdistill report",
        _intro(results),
        "## Teacher (Table 3 layout)",
        teacher_table(main),
        "## Baseline and distillation per magnification (Table 4 layout)",
        methods_table(main),
        "### Paired differences on the same test tissues",
        f"The same {resamples} resampled index sets score both methods (their sample keys checked), so each CI is "
        "that of the difference itself; P(Δ ≤ 0) is the share of resamples where the first method does not win.",
        paired_table(comparisons),
        "### The teachers beside their students",
        teachers_table(main),
        "### Does the paper's ordering hold?",
        "\n".join(ordering_check(main, comparisons)) or "_Not enough runs to check._",
        "## Accuracy against compute (Figure 3 layout)",
        f"![accuracy vs GFLOPs]({plot_accuracy_vs_gflops(main, out / 'figure3.png', 'Accuracy vs compute').name})",
    ]
    sections += _unit_sections(main, out)
    if ablation:
        methods = [m for m in ABLATION_ORDER if any(r.method == m for r in ablation)]
        sections += [
            "## Pixel-loss ablation (KD, KD+MP, KD+INT, KD+MP+INT)",
            methods_table(ablation, methods),
            f"![ablation]({plot_accuracy_vs_gflops(ablation, out / 'ablation.png', 'Pixel-loss ablation').name})",
        ]
    if any(len(runs) > 1 for runs in by_run(main).values()):
        sections[4:4] = [
            "## Over training seeds",
            "Mean ± sd over the seeds (sample sd), and each seed's value. The "
            "tables show the lowest seed's run; the paired differences below pool every seed "
            "(each seed's resampled differences concatenated).",
            seeds_table(main),
        ]
    sections += provenance_section(results)
    sections.append("Sources: " + ", ".join(f"`{r.source}`" for r in results))
    path = out / "report.md"
    atomic_write_text(path, "\n\n".join(sections) + "\n")
    return path
