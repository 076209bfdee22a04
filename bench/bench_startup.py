"""What `predict` pays before its first slide: `hpcdistill predict --help`, importing the prediction stage, the time
from launch until `predict` starts its first slide, and a whole one-slide `predict` of a tiny slide, as wall seconds
of fresh processes (medians of interleaved rounds), for this tree and, side by side, for another checkout
(--reference, e.g. a `git worktree` of an earlier commit); plus the heaviest imports (`python -X importtime`) and
whether scipy.stats (the evaluation stack) is loaded.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_startup.py --reference /tmp/hpcdistill-before --rounds 5
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import describe, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMPORT = "import sys, hpcdistill.predict.prediction as p; print('scipy.stats' in sys.modules)"
# The whole `predict` command, with a probe that prints the wall clock as its first slide starts.
FIRST_SLIDE = """import sys, time, runpy
import hpcdistill.predict.prediction as p
real = p.predict_slide
def probe(*args, **kwargs):
    print(f"first slide at {time.time()!r}", flush=True)
    p.predict_slide = real
    return real(*args, **kwargs)
p.predict_slide = probe
sys.argv = ["hpcdistill", *sys.argv[1:]]
runpy.run_module("hpcdistill", run_name="__main__")
"""


def run(tree: Path, argv: list[str]) -> tuple[float, str]:
    """Wall seconds of a fresh process (to its first slide, for the FIRST_SLIDE probe), and what it printed."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    start, started = time.perf_counter(), time.time()
    done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, cwd=tree)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(argv)} failed: {done.stderr[-500:]}")
    first = re.search(r"first slide at (\S+)", done.stdout)
    return (float(first.group(1)) - started if first else wall), done.stdout + done.stderr


def heaviest(tree: Path, top: int = 8) -> list[str]:
    _, text = run(tree, ["-X", "importtime", "-c", "import hpcdistill.predict.prediction"])
    rows = [m.groups() for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", text)]
    ours = sorted(
        ((int(us), name) for us, name in rows if "." not in name or name.startswith("hpcdistill")), reverse=True
    )
    return [f"{name} {us / 1e6:.2f} s" for us, name in ours[:top]]


def tiny_inputs(folder: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO))
    import torch

    from hpcdistill.models.export import export_blob
    from hpcdistill.models.resnet import build_model
    from hpcdistill.slides.windows import DEFAULT_WINDOWING
    from hpcdistill.synthetic.dataset import write_slide
    from hpcdistill.synthetic.specs import SlideSpec

    slide = folder / "tiny.tiff"
    write_slide(slide, SlideSpec(2048, 1536, fmt="tiff", base_mag=20, class_id=0, seed=1, tissues=2))
    torch.manual_seed(0)
    model = build_model("resnet10", 3, width=16, groups=8, stem="lowres")
    stats = {"1.25x": {"mean": [0.8, 0.6, 0.75], "std": [0.15, 0.2, 0.15]}}
    blob = export_blob(
        model,
        mag=1.25,
        classes=["a", "b", "c"],
        stats=stats,
        config={},
        global_step=0,
        windowing=dict(DEFAULT_WINDOWING),
    )
    torch.save(blob, folder / "m.pt")
    return slide, folder / "m.pt"


def measure(trees: dict[str, Path], rounds: int, scratch: Path) -> dict[str, dict[str, list[float]]]:
    slide, model = tiny_inputs(scratch)
    cases = {
        "predict --help": ["-m", "hpcdistill", "predict", "--help"],
        "import the prediction stage": ["-c", IMPORT],
        "predict: its first slide reached": ["-c", FIRST_SLIDE, "predict", str(model), str(slide), "--out"],
        "predict one tiny slide (whole command)": ["-m", "hpcdistill", "predict", str(model), str(slide), "--out"],
    }
    times: dict[str, dict[str, list[float]]] = {name: {case: [] for case in cases} for name in trees}
    for r in range(rounds):
        for name, tree in trees.items():
            for c, (case, argv) in enumerate(cases.items()):
                extra = [str(scratch / f"out-{name}-{r}-{c}"), "--no-progress"] if argv[-1] == "--out" else []
                times[name][case].append(run(tree, argv + extra)[0])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", help="another checkout to measure beside this one (its repository root)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench" / "results_startup.md"))
    args = parser.parse_args()
    trees = {"this tree": REPO, **({"reference": Path(args.reference).resolve()} if args.reference else {})}
    with tempfile.TemporaryDirectory() as scratch:
        times = measure(trees, args.rounds, Path(scratch))
    cases = list(next(iter(times.values())))
    lines = [
        f"# predict's start-up\n\n{describe()}\n",
        "| case | " + " | ".join(trees) + " |",
        "|---" * (1 + len(trees)) + "|",
    ]
    for case in cases:
        lines.append(f"| {case} | " + " | ".join(f"{statistics.median(times[n][case]):.2f} s" for n in trees) + " |")
    lines.append(f"\nMedians of {args.rounds} interleaved rounds, fresh processes.\n")
    for name, tree in trees.items():
        scipy = run(tree, ["-c", IMPORT])[1].strip().splitlines()[-1]
        lines.append(
            f"**{name}** ({tree}): scipy.stats loaded by the prediction stage: {scipy}; heaviest imports "
            f"(cumulative, `python -X importtime`): " + "; ".join(heaviest(tree)) + "\n"
        )
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
