"""`predict` end to end on a realistic 40x slide: slides per hour per core and where the time goes, for the 10x
teacher and the 2.5x and 1.25x students, each reading level 0 and reading the pyramid.

The slide: 40x, 40960x30720 px (--size), a 4x pyramid made as scanners make it (each level the one above shrunk
with an area filter and JPEG-encoded again), JPEG tiles, several tissues; written once into --cache. The models:
the demo's architectures (configs/demo: ResNet-10, width 16; halfres stem at 10x, lowres for the students) with
random weights, since speed does not depend on the weights. One process, one thread (OMP_NUM_THREADS=1,
VIPS_CONCURRENCY=1, libvips' operation cache off: each slide is read once, as in a batch of thousands).

Stages, per slide: open (metadata, pyramid), thumbnail and tissue (find_windows), read and decode (the level crops'
pixels, timed in a separate decode-only pass over the same windows), resample (the reads minus their decode),
model (the forward passes), write (overlay PNG, GeoJSON, CSVs). Rounds interleave the six configurations; medians.

    OMP_NUM_THREADS=1 VIPS_CONCURRENCY=1 .venv/bin/python bench/bench_predict.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VIPS_CONCURRENCY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyvips  # noqa: E402
import torch  # noqa: E402
from bench_env import describe, median_spread, publish  # noqa: E402

from hpcdistill.common.config import load_config  # noqa: E402
from hpcdistill.common.mags import mag_name  # noqa: E402
from hpcdistill.models.export import export_blob  # noqa: E402
from hpcdistill.models.resnet import build_model  # noqa: E402
from hpcdistill.predict import prediction  # noqa: E402
from hpcdistill.slides.factory import open_slide  # noqa: E402
from hpcdistill.slides.slide import Slide  # noqa: E402
from hpcdistill.slides.windows import DEFAULT_WINDOWING  # noqa: E402
from hpcdistill.synthetic.dataset import write_slide  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = {"teacher 10x": ("configs/demo/teacher.yaml", 10.0), "student 2.5x": ("configs/demo/distill.yaml", 2.5)}
MODELS["student 1.25x"] = ("configs/demo/distill.yaml", 1.25)
STAGES = ("open", "thumbnail and tissue", "read and decode", "resample", "model", "write")


def bench_slide(cache: Path, size: tuple[int, int]) -> Path:
    path = cache / f"scanner-40x-{size[0]}x{size[1]}.svs"
    if not path.is_file():
        print(f"writing {path} (once)", flush=True)
        write_slide(path, *size, fmt="svs", base_mag=40, seed=11, n_tissues=6, pyramid="scanner")
    return path


def bench_model(cache: Path, name: str) -> Path:
    config, mag = MODELS[name]
    path = cache / f"{name.replace(' ', '-')}.pt"
    if not path.is_file():
        m = load_config(REPO / config).model
        torch.manual_seed(0)
        model = build_model(m.arch, 3, width=m.width, groups=m.groups, stem=m.stem)
        stats = {"mean": [0.8, 0.6, 0.75], "std": [0.15, 0.2, 0.15]}
        blob = export_blob(
            model,
            mag=mag,
            classes=["a", "b", "c"],
            stats={mag_name(mag): stats},
            config={},
            global_step=0,
            windowing=dict(DEFAULT_WINDOWING),
        )
        torch.save(blob, path)
    return path


class Timers:
    """Seconds per stage, summed over a run, by wrapping the functions `predict` calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.decoded: dict[int, int] = defaultdict(int)
        self.window_px = 0

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, owner: object, attr: str, stage: str) -> None:
        real = getattr(owner, attr)

        def timed(*args, **kwargs):
            with self.stage(stage):
                return real(*args, **kwargs)

        setattr(owner, attr, timed)


@contextmanager
def instrumented(timers: Timers):
    saved = {(o, a): getattr(o, a) for o, a in INSTRUMENTED}
    timers.wrap(prediction, "open_slide", "open")
    timers.wrap(prediction, "find_windows", "thumbnail and tissue")
    timers.wrap(prediction, "_write_overlay", "write")
    timers.wrap(prediction, "write_geojson", "write")
    timers.wrap(prediction, "write_predictions", "write")
    real_read = Slide.read_at_mag

    def read(self, box, mag, size, source="level0"):
        before = dict(self.decoded_pixels)
        with timers.stage("read"):
            out = real_read(self, box, mag, size, source)
        for level, count in self.decoded_pixels.items():
            timers.decoded[level] += count - before.get(level, 0)
        timers.window_px += int(box[2]) * int(box[3])
        return out

    Slide.read_at_mag = read
    try:
        yield
    finally:
        for (owner, attr), value in saved.items():
            setattr(owner, attr, value)


INSTRUMENTED = [(prediction, a) for a in ("open_slide", "find_windows", "_write_overlay", "write_geojson")]
INSTRUMENTED += [(prediction, "write_predictions"), (Slide, "read_at_mag")]


def decode_only(slide_path: Path, model: Path, read: str) -> float:
    """Seconds to decode the level crops the windows need, nothing else (the floor of 'read')."""
    exported = prediction.load_exported(model)
    with open_slide(slide_path) as slide:
        found = prediction.find_windows(slide, prediction.PredictOptions().tissue, exported.windowing)
        level = slide.level_for(exported.mag) if read == "pyramid" else slide.levels()[0]
        start = time.perf_counter()
        for windows in found.windows:
            for x, y, w, h in windows:
                box = (
                    round(x / level.scale_x),
                    round(y / level.scale_y),
                    round(w / level.scale_x),
                    round(h / level.scale_y),
                )
                inner, _ = slide._clip(box, level, (x, y, w, h))
                with slide._read_level(level, inner) as crop:
                    crop.numpy()
        return time.perf_counter() - start


def forward_timer(timers: Timers):
    """Times every forward pass of the model `predict` loads."""
    real_load = prediction.load_exported

    def load(path):
        exported = real_load(path)
        starts = []
        exported.model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        exported.model.register_forward_hook(
            lambda *_: timers.seconds.__setitem__("model", timers.seconds["model"] + time.perf_counter() - starts.pop())
        )
        return exported

    return load


def one_run(slide: Path, model: Path, read: str, out: Path) -> dict:
    timers = Timers()
    decode = decode_only(slide, model, read)
    real_load = prediction.load_exported
    prediction.load_exported = forward_timer(timers)
    try:
        with instrumented(timers):
            start = time.perf_counter()
            prediction.predict_slides(model, [slide], out, device="cpu", read=read)
            wall = time.perf_counter() - start
    finally:
        prediction.load_exported = real_load
    stages = dict(timers.seconds)
    stages["read and decode"] = min(decode, stages.get("read", 0.0))
    stages["resample"] = stages.pop("read", 0.0) - stages["read and decode"]
    scaled = sum(count * 1.0 for count in timers.decoded.values())
    return {"wall": wall, "stages": stages, "decoded_fraction": scaled / max(1, timers.window_px)}


def table(results: dict[str, list[dict]], rounds: int) -> str:
    rows = [
        "| model | read | slides/hour/core | s/slide (range) | " + " | ".join(STAGES) + " | px decoded / level-0 px |"
    ]
    rows.append("|---" * (5 + len(STAGES)) + "|")
    teacher0 = statistics.median(r["wall"] for r in results["teacher 10x|level0"])
    for key, runs in results.items():
        name, read = key.split("|")
        med, low, high = median_spread([r["wall"] for r in runs])
        stages = [statistics.median(r["stages"].get(s, 0.0) for r in runs) for s in STAGES]
        fraction = statistics.median(r["decoded_fraction"] for r in runs)
        rows.append(
            f"| {name} | {read} | {3600 / med:,.0f} ({teacher0 / med:.1f}x teacher level 0) | {med:.2f} "
            f"({low:.2f}-{high:.2f}) | " + " | ".join(f"{s:.2f}" for s in stages) + f" | {fraction:.4g} |"
        )
    return "\n".join(rows) + f"\n\nMedians of {rounds} interleaved rounds; stage seconds per slide."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="40960x30720", help="level-0 WIDTHxHEIGHT of the 40x bench slide")
    parser.add_argument("--cache", default=str(REPO / "bench" / "out"), help="where the slide and models are kept")
    parser.add_argument("--out", default=str(REPO / "bench" / "results_predict.md"))
    args = parser.parse_args()
    pyvips.cache_set_max(0)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    size = tuple(int(v) for v in args.size.split("x"))
    slide = bench_slide(cache, size)
    models = {name: bench_model(cache, name) for name in MODELS}
    results: dict[str, list[dict]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):
            for name, model in models.items():
                for read in ("level0", "pyramid"):
                    run = one_run(slide, model, read, Path(scratch) / f"{r}-{name}-{read}")
                    results[f"{name}|{read}"].append(run)
                    print(f"round {r}: {name} {read}: {run['wall']:.2f} s", flush=True)
    with open_slide(slide) as s:
        levels = ", ".join(f"{lv.width}x{lv.height} ({mag_name(lv.magnification(40))})" for lv in s.levels())
    head = f"# predict on one 40x slide\n\n{describe()}\n\nSlide: {slide.name}, levels {levels}.\n\n"
    publish(head + table(results, args.rounds) + "\n", args.out)


if __name__ == "__main__":
    main()
