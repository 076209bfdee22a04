"""`hpcdistill demo`: the paper's experiment end to end on an embedded synthetic dataset, on a laptop.

synth (labeled train/val/test + unlabeled ADv1 ⊂ ADv2) -> shard (10x and two low magnifications) -> one experiment
through the same launcher users run on SLURM: teacher at 10x, then per low magnification the baseline, KD on the
labeled training tissues (labels unused), and KD with each auxiliary set -> evaluation with bootstrap CIs and GFLOPs
-> report (Table 3/4 layouts, Figure 3). Every step is resumable: rerunning the command reuses finished work.

The synthetic class signal lives in nuclear size, shape and density at equal nuclear area (hpcdistill.synthetic), so
it fades with magnification: that is what makes the low-magnification baseline lose accuracy and gives the teacher
something to teach.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hpcdistill.errors import HpcdistillError
from hpcdistill.mags import mag_name


@dataclass(frozen=True)
class DemoPlan:
    """The knobs of one demo run: the full demo, or the shortened one CI runs."""

    slides: dict  # labeled slides per split
    aux1: int  # unlabeled slides in ADv1
    aux2: int  # extra unlabeled slides that make ADv2 = ADv1 + these
    size: tuple[int, int]  # slide size at 40x (20x slides cover the same area with half the pixels)
    mags: tuple[float, ...]  # the two low magnifications the students see
    teacher_epochs: int
    student_epochs: int
    iterations: int  # bootstrap resamples
    epoch_samples: int = 64  # tissues drawn per epoch by every run (see below)


FULL = DemoPlan(slides={"train": 18, "val": 9, "test": 30}, aux1=24, aux2=36, size=(3072, 2304), mags=(2.5, 1.25),
                teacher_epochs=40, student_epochs=80, iterations=10000)
QUICK = DemoPlan(slides={"train": 3, "val": 3, "test": 3}, aux1=1, aux2=1, size=(1536, 1152), mags=(2.5, 1.25),
                 teacher_epochs=1, student_epochs=1, iterations=200, epoch_samples=16)
# epoch_samples: every run draws the same number of tissues per epoch (resampled from its shards), so all methods get
# the same number of optimizer steps and KD with an auxiliary set sees more *distinct* tissues for the same compute,
# as in the paper. Micro-batch 1 without accumulation: the demo's labeled set is small, so steps are what is scarce.

# Methods of Table 4: (key, label, config, overrides). KD reads the labeled train tissues without their labels;
# KD (ADv1) reads train + ADv1; KD (ADv2) reads train + ADv1 + ADv2.
METHODS = (
    ("baseline", "Baseline", "configs/demo/baseline.yaml", []),
    ("kd", "KD", "configs/demo/distill.yaml", ["data.aux=[]"]),
    ("kd_adv1", "KD (ADv1)", "configs/demo/distill.yaml", ["data.aux=[aux1]"]),
    ("kd_adv2", "KD (ADv2)", "configs/demo/distill.yaml", ["data.aux=[aux1,aux2]"]),
)


def prepare_data(root: Path, plan: DemoPlan, workers: int, seed: int) -> Path:
    """Synthetic slides and their shards under root; reuses what a previous run finished."""
    from hpcdistill.sharding import ShardParams, run_sharding
    from hpcdistill.synthetic import write_dataset

    slides_dir = root / "slides"
    labels = slides_dir / "labels.csv"
    if not labels.is_file():  # write_dataset writes labels.csv last, so its presence means the slides are complete
        write_dataset(slides_dir, n_slides_per_split=plan.slides, n_aux1=plan.aux1, n_aux2=plan.aux2,
                      size=plan.size, seed=seed)
    shards = root / "shards"
    run_sharding([slides_dir], shards, labels_csv=str(labels),
                 params=ShardParams(mags=(10.0, *plan.mags), seed=seed), workers=workers)
    return shards


def write_experiment(out: Path, shards: Path, plan: DemoPlan) -> Path:
    """The demo as an experiment file: exactly what `hpcdistill launch` takes."""
    steps = [f"data.epoch_samples={plan.epoch_samples}", "train.grad_accum=1"]
    epochs = [f"train.epochs={plan.student_epochs}", *steps]
    experiment = {
        "name": "experiment",
        "out_dir": str(out.resolve()),
        "shards": str(shards.resolve()),
        "mags": list(plan.mags),
        "teacher": {"config": "configs/demo/teacher.yaml", "overrides": [f"train.epochs={plan.teacher_epochs}", *steps]},
        "methods": {key: {"config": config, "label": label, "overrides": overrides + epochs}
                    for key, label, config, overrides in METHODS},
        "evaluate": {"split": "test", "iterations": plan.iterations},
        "resources": {"default": {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1,
                                  "mem_gb": 4, "timeout_min": 60, "signal_delay_s": 30, "max_requeue": 3}},
    }
    path = out / "experiment.yaml"
    path.write_text("# Written by `hpcdistill demo`; rerun it with `hpcdistill launch " + str(path) + "`\n"
                    + yaml.safe_dump(experiment, sort_keys=False))
    return path


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, slurm: bool = False, workers: int = 2,
             seed: int = 0) -> dict[str, Any]:
    """Run the whole demo; returns where everything is."""
    from hpcdistill.demo_record import write_record
    from hpcdistill.launch import launch
    from hpcdistill.report import load_results, ordering_check

    plan = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"[1/3] synthetic slides and shards in {out / 'synthetic'}", flush=True)
    shards = prepare_data(out / "synthetic", plan, workers, seed)
    phases = {"slides and shards": time.monotonic() - started}
    experiment = write_experiment(out, shards, plan)
    mags = ", ".join(mag_name(m) for m in plan.mags)
    print(f"[2/3] teacher @ 10x, then baseline / KD / KD (ADv1) / KD (ADv2) @ {mags} "
          f"({'SLURM' if slurm else 'local processes'})", flush=True)
    record = launch(experiment, cluster="slurm" if slurm else "local", wait=slurm)
    exp_dir = Path(record["exp_dir"])
    report = exp_dir / "report" / "report.md"
    if not report.is_file():
        raise HpcdistillError(f"{report}: the evaluation job did not write the report (see {exp_dir}/launch.json)")
    print("[3/3] evaluation and report", flush=True)
    phases.update({job["label"] or job["key"]: job["finished"] - job["started"] for job in record["jobs"]})
    results = load_results([exp_dir])  # every run's eval/*.json under the experiment folder
    summary = {
        "report": str(report),
        "figure": str(report.parent / "figure3.png"),
        "tensorboard": str(exp_dir),
        "shards": str(shards),
        "experiment": str(experiment),
        "ordering": ordering_check(results),
        "minutes": round((time.monotonic() - started) / 60, 1),
        "phase_minutes": {name: round(seconds / 60, 1) for name, seconds in phases.items()},
    }
    record = write_record(out, summary)
    print("\n".join(summary["ordering"]))
    print("\ntime per phase (jobs run side by side where the cores allow): "
          + ", ".join(f"{name} {m} min" for name, m in summary["phase_minutes"].items()))
    print(f"\nreport:      {summary['report']}\nfigure 3:    {summary['figure']}\nshards:      {shards}\n"
          f"experiment:  {experiment}  (rerun on SLURM: hpcdistill launch {experiment})\n"
          f"tensorboard: tensorboard --logdir {exp_dir}\n"
          f"record:      {record}  (times, versions, machine; `make readme-demo` puts it in the README)\n"
          f"done in {summary['minutes']} min")
    return summary
