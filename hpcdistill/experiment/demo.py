"""`hpcdistill demo`: the paper's experiment end to end on an embedded synthetic dataset, on a laptop.

synth (labeled train/val/test + unlabeled ADv1 ⊂ ADv2) -> shard (10x and two low magnifications) -> one experiment
through the same launcher users run on SLURM: teacher at 10x, then per low magnification the baseline, KD on the
labeled training tissues (labels unused), and KD with each auxiliary set -> evaluation with bootstrap CIs and GFLOPs
-> report (Table 3/4 layouts, Figure 3). Every step is resumable: rerunning the command reuses finished work.

The synthetic class signal lives in nuclear size, shape and density at equal nuclear area
(hpcdistill.synthetic.dataset), so
it fades with magnification: that is what makes the low-magnification baseline lose accuracy and gives the teacher
something to teach.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hpcdistill.common.errors import LaunchError
from hpcdistill.common.files import atomic_write_text
from hpcdistill.common.mags import mag_name
from hpcdistill.common.typed_tree import read_yaml
from hpcdistill.config.schema import resolve_path

DEMO_EXPERIMENT = "configs/experiments/demo.yaml"  # the one demo experiment: methods, epochs, resources


@dataclass(frozen=True)
class DemoPlan:
    """The demo's dataset, and what the shortened demo CI runs changes in the demo experiment."""

    slides: dict  # labeled slides per split
    aux1: int  # unlabeled slides in ADv1
    aux2: int  # extra unlabeled slides that make ADv2 = ADv1 + these
    size: tuple[int, int]  # slide size at 40x (20x slides cover the same area with half the pixels)
    overrides: tuple[str, ...] = ()  # appended to every job's overrides (later ones win)
    iterations: int | None = None  # bootstrap resamples, instead of the experiment's


FULL = DemoPlan(slides={"train": 18, "val": 9, "test": 30}, aux1=24, aux2=36, size=(3072, 2304))
QUICK = DemoPlan(
    slides={"train": 3, "val": 3, "test": 3},
    aux1=1,
    aux2=1,
    size=(1536, 1152),
    overrides=(
        "train.epochs=1",
        "data.epoch_samples=16",
        "teacher.gate=warn",
    ),  # a smoke run: its teacher is not taught
    iterations=200,
)


def prepare_data(root: Path, plan: DemoPlan, mags: list[float], workers: int, seed: int) -> Path:
    """Synthetic slides and their shards (10x and the experiment's magnifications) under root; reuses what a previous
    run finished."""
    from hpcdistill.shards.sharding import ShardParams, run_sharding
    from hpcdistill.synthetic.dataset import write_dataset
    from hpcdistill.synthetic.specs import DatasetSpec

    slides_dir = root / "slides"
    labels = slides_dir / "labels.csv"
    if not labels.is_file():  # write_dataset writes labels.csv last, so its presence means the slides are complete
        write_dataset(
            slides_dir,
            DatasetSpec(
                slides_per_split=plan.slides,
                aux1=plan.aux1,
                aux2=plan.aux2,
                size=plan.size,
                seed=seed,
                pyramid="scanner",  # as a scanner writes levels: what `predict --read pyramid` meets on real slides
            ),
            workers=workers,
        )
    shards = root / "shards"
    run_sharding(
        [slides_dir], shards, labels_csv=str(labels), params=ShardParams(mags=(10.0, *mags), seed=seed), workers=workers
    )
    return shards


def demo_experiment() -> dict[str, Any]:
    """configs/experiments/demo.yaml, as a mapping."""
    return read_yaml(resolve_path(DEMO_EXPERIMENT), ())


def write_experiment(out: Path, shards: Path, plan: DemoPlan, experiment: dict[str, Any], seeds: int = 1) -> Path:
    """The demo experiment pointed at this demo's folders (and shortened for QUICK): what `hpcdistill launch` takes."""
    experiment = copy.deepcopy(experiment)  # the caller's mapping stays as read
    experiment.update(name="experiment", out_dir=str(out.resolve()), shards=str(shards.resolve()))
    for job in [experiment["teacher"], *experiment["methods"].values()]:
        job["overrides"] = [*job.get("overrides", []), *plan.overrides]
    if plan.iterations is not None:
        experiment["evaluate"]["iterations"] = plan.iterations
    if seeds > 1:  # every run repeated per training seed; the report pools them
        experiment["seeds"] = list(range(seeds))
    path = out / "experiment.yaml"
    atomic_write_text(
        path,
        f"# Written by `hpcdistill demo` from {DEMO_EXPERIMENT}; rerun it with `hpcdistill launch "
        f"{path}`\n" + yaml.safe_dump(experiment, sort_keys=False),
    )
    return path


def run_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    cluster: str = "local",
    workers: int = 2,
    seed: int = 0,
    seeds: int = 1,
) -> dict[str, Any]:
    """Run the whole demo; returns where everything is."""
    from hpcdistill.experiment.demo_record import write_record
    from hpcdistill.experiment.launch import launch_experiment

    if seeds < 1:
        raise LaunchError(f"--seeds {seeds}: must be at least 1")
    plan = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"[1/3] synthetic slides and shards in {out / 'synthetic'}", flush=True)
    spec = demo_experiment()
    mags = [float(m) for m in spec["mags"]]
    shards = prepare_data(out / "synthetic", plan, mags, workers, seed)
    phases = {"slides and shards": time.monotonic() - started}
    experiment = write_experiment(out, shards, plan, spec, seeds)
    labels = " / ".join(m.get("label", key) for key, m in spec["methods"].items())
    print(
        f"[2/3] teacher @ 10x, then {labels} @ {', '.join(map(mag_name, mags))} "
        f"({ {'slurm': 'SLURM', 'local': 'local processes', 'debug': 'in this process'}[cluster] })",
        flush=True,
    )
    record = launch_experiment(experiment, cluster=cluster, wait=cluster == "slurm")
    summary = _summarise(record, phases, shards, experiment, started)
    _print_summary(summary, write_record(out, summary))
    return summary


def _summarise(
    record: dict[str, Any], phases: dict[str, float], shards: Path, experiment: Path, started: float
) -> dict[str, Any]:
    """Where the launched demo's results are, its ordering line and its time per phase."""
    from hpcdistill.evaluate.comparisons import paired_comparisons
    from hpcdistill.evaluate.ordering import ordering_check
    from hpcdistill.evaluate.report import load_results

    exp_dir = Path(record["exp_dir"])
    report = exp_dir / "report" / "report.md"
    if not report.is_file():
        raise LaunchError(f"{report}: the evaluation job did not write the report (see {exp_dir}/launch.json)")
    print("[3/3] evaluation and report", flush=True)
    phases.update({job["label"] or job["key"]: job["finished"] - job["started"] for job in record["jobs"]})
    results = load_results([exp_dir])  # every run's eval/*.json under the experiment folder
    summary = {
        "report": str(report),
        "figure": str(report.parent / "figure3.png"),
        "tensorboard": str(exp_dir),
        "shards": str(shards),
        "experiment": str(experiment),
        "teachers": teacher_lines(results),
        "ordering": ordering_check(results, paired_comparisons(results)),
        "slide_level": slide_lines(results),
        "resamples": sorted({r.ci[1] for r in results}),  # what the evaluation used, for the README's text
        "minutes": round((time.monotonic() - started) / 60, 1),
        "phase_minutes": {name: round(seconds / 60, 1) for name, seconds in phases.items()},
    }
    return summary


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def teacher_lines(results: list) -> list[str]:
    """Each teacher's validation accuracy (what the gate judged) and test accuracy, per seed."""
    from hpcdistill.scoring.method_labels import TEACHER

    teachers = sorted((r for r in results if r.method == TEACHER), key=lambda r: (r.seed is None, r.seed))
    return [
        f"teacher{'' if r.seed is None else f' s{r.seed}'}: validation {_pct(r.val_accuracy)} (at its pick), test "
        f"{100 * r.metrics['accuracy'][0]:.1f}%"
        for r in teachers
    ]


def slide_lines(results: list) -> list[str]:
    """Each run's slide-level accuracy and AUROC beside its tissue-level accuracy, for the terminal."""
    from hpcdistill.evaluate.report import format_ci

    lines = ["slide level (tissue level) accuracy, slide-level AUROC:"]
    for r in sorted(results, key=lambda r: (-r.mag, r.method)):
        slide = r.units.get("slide")
        if slide:
            lines.append(
                f"  {r.method} @ {mag_name(r.mag)}: {format_ci(slide['metrics']['accuracy'])} "
                f"({format_ci(r.metrics['accuracy'])}), AUROC {format_ci(slide['metrics']['auroc'])}"
            )
    return lines


def _print_summary(summary: dict[str, Any], record: Path) -> None:
    print("\n".join(summary["teachers"]))
    print("\n".join(summary["ordering"]))
    print("\n" + "\n".join(summary["slide_level"]))
    print(
        "\ntime per phase (jobs run side by side where the cores allow): "
        + ", ".join(f"{name} {m} min" for name, m in summary["phase_minutes"].items())
    )
    print(
        f"\nreport:      {summary['report']}\nfigure 3:    {summary['figure']}\nshards:      {summary['shards']}\n"
        f"experiment:  {summary['experiment']}  (rerun on SLURM: hpcdistill launch {summary['experiment']})\n"
        f"tensorboard: tensorboard --logdir {summary['tensorboard']}\n"
        f"record:      {record}  (times, versions, machine; `make readme-demo` puts it in the README)\n"
        f"done in {summary['minutes']} min"
    )
