"""The two Python ends of bench/gpu_check.sh: `data` writes, on a CPU machine, the small slides and shards the check
trains on (they travel with the checkout, so the GPU machine spends no time sharding); `summary` turns the check's
step log, run summaries, evaluation and bench_gpu.py results into one JSON and one markdown table.

    python bench/gpu_check.py data gpu-check-data        # here, once (about 1 minute)
    python bench/gpu_check.py summary runs/gpu-check     # gpu_check.sh calls it at the end
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The check's dataset: big enough for a few epochs and a test split, small enough to travel with the checkout.
GPU_CHECK_PLAN = {"slides": {"train": 6, "val": 3, "test": 3}, "aux1": 3, "aux2": 0, "size": (3072, 2304)}


def write_data(root: Path, quick: bool = False) -> Path:
    """Synthetic slides and their shards at 10x and 2.5x under root, through the demo's own data step (reused when
    present); `quick`: the shortened demo's dataset."""
    from hpcdistill.experiment.demo import QUICK, DemoPlan, prepare_data

    shards = prepare_data(root, QUICK if quick else DemoPlan(**GPU_CHECK_PLAN), [2.5], workers=2, seed=0)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"{root}: {size / 2**20:.1f} MiB of slides and shards")
    return shards


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarise(out: Path) -> dict:
    steps = [line.split() for line in (out / "steps.txt").read_text().splitlines() if line.strip()]
    result = {
        "steps": {name: {"status": status, "seconds": int(seconds)} for name, status, seconds in steps},
        "evaluate": read_json(out / "eval" / "test.json"),
        "bench": read_json(out / "bench" / "gpu.json"),
        "train": {name: read_json(out / f"{name}.json") for name in ("teacher", "distill")},
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    return result


def markdown(result: dict, out: Path) -> str:
    lines = ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {s['status']} | {s['seconds']} |" for name, s in result["steps"].items()]
    ev = result["evaluate"]
    if ev:
        lines += ["", f"evaluate: accuracy {100 * ev['metrics']['accuracy'][0]:.2f} on {ev['samples']} test tissues"]
    bench = out / "bench" / "gpu.md"
    if bench.is_file():
        lines += ["", bench.read_text()]
    text = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(text)
    return text


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("data", "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "data":
        write_data(Path(argv[1]))
    else:
        out = Path(argv[1])
        print(markdown(summarise(out), out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
