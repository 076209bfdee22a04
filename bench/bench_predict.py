"""`predict` end to end on realistic 40x slides: the marginal cost of a slide (the time inside `predict_slide`, with
what a user gets by default: overlay, tissue outlines and GeoJSON; `--heatmap` as extra rows), as slides per hour per
core, and where it goes, for the 10x teacher and the 2.5x and 1.25x students, each reading level 0 and the pyramid.

The slides: 40x, 40960x30720 px (--size), several tissues, JPEG tiles, with two pyramids: "scanner" (each /4 level
the one above shrunk and JPEG-encoded again, as scanners make them) and "render" (what `synth` writes by default:
each level drawn at its own resolution); written once into --cache. The models: the demo's architectures
(configs/demo: ResNet-10, width 16; halfres stem at 10x, lowres for the students) with random weights, since speed
does not depend on the weights. One process, one thread (OMP_NUM_THREADS=1, VIPS_CONCURRENCY=1, libvips' operation
cache off: each slide is read once, as in a batch of thousands).

Stages, per slide: open (metadata, pyramid), thumbnail and tissue (find_windows), read and decode (the level crops'
pixels, timed in a separate decode-only pass over the same windows), resample (the reads minus their decode),
model (the forward passes), outlines (tissue_outlines), write (overlay PNG, heat maps, GeoJSON). Rounds interleave
the configurations; medians. The profile of the 1.25x student's slide (pyramid, default outputs) follows the table.

    OMP_NUM_THREADS=1 VIPS_CONCURRENCY=1 .venv/bin/python bench/bench_predict.py --rounds 3
    OMP_NUM_THREADS=1 VIPS_CONCURRENCY=1 .venv/bin/python bench/bench_predict.py --quick   # < 1 min, prints ratios
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

from hpcdistill.common.mags import mag_name  # noqa: E402
from hpcdistill.config.loading import load_config  # noqa: E402
from hpcdistill.models.export import export_blob  # noqa: E402
from hpcdistill.models.resnet import build_model  # noqa: E402
from hpcdistill.predict import prediction  # noqa: E402
from hpcdistill.predict.options import PredictOptions, check_options  # noqa: E402
from hpcdistill.slides.factory import open_slide  # noqa: E402
from hpcdistill.slides.slide import Slide  # noqa: E402
from hpcdistill.slides.windows import DEFAULT_WINDOWING  # noqa: E402
from hpcdistill.synthetic.dataset import write_slide  # noqa: E402
from hpcdistill.synthetic.specs import SlideSpec

REPO = Path(__file__).resolve().parents[1]
MODELS = {"teacher 10x": ("configs/demo/teacher.yaml", 10.0), "student 2.5x": ("configs/demo/distill.yaml", 2.5)}
MODELS["student 1.25x"] = ("configs/demo/distill.yaml", 1.25)
STAGES = ("open", "thumbnail and tissue", "read and decode", "resample", "model", "outlines", "write")
# (model, read, heat maps); the ratio column compares each row with the teacher reading level 0 with the same outputs
CONFIGS = [
    ("teacher 10x", "level0", False),
    ("teacher 10x", "pyramid", False),
    ("student 2.5x", "level0", False),
    ("student 2.5x", "pyramid", False),
    ("student 1.25x", "level0", False),
    ("student 1.25x", "pyramid", False),
    ("teacher 10x", "level0", True),
    ("student 2.5x", "pyramid", True),
    ("student 1.25x", "pyramid", True),
]
PYRAMIDS = ("scanner", "render")


def bench_slide(cache: Path, size: tuple[int, int], pyramid: str) -> Path:
    path = cache / f"{pyramid}-40x-{size[0]}x{size[1]}.svs"
    if not path.is_file():
        print(f"writing {path} (once)", flush=True)
        write_slide(path, SlideSpec(*size, fmt="svs", base_mag=40, seed=11, tissues=6, pyramid=pyramid))
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
    timers.wrap(prediction, "tissue_outlines", "outlines")
    timers.wrap(prediction, "_write_overlay", "write")
    timers.wrap(prediction, "_write_heatmaps", "write")
    timers.wrap(prediction, "write_geojson", "write")
    timers.wrap(prediction, "predict_slide", "slide")
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


INSTRUMENTED = [(prediction, a) for a in ("open_slide", "find_windows", "tissue_outlines", "_write_overlay")]
INSTRUMENTED += [(prediction, a) for a in ("_write_heatmaps", "write_geojson", "predict_slide")]
INSTRUMENTED += [(Slide, "read_at_mag")]


def decode_only(slide_path: Path, model: Path, read: str) -> float:
    """Seconds to decode the level crops the windows need, nothing else (the floor of 'read')."""
    exported = prediction.load_exported(model)
    with open_slide(slide_path) as slide:
        found = prediction.find_windows(slide, PredictOptions().tissue, exported.windowing)
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


def one_run(slide: Path, model: Path, read: str, heatmap: bool, out: Path) -> dict:
    timers = Timers()
    decode = decode_only(slide, model, read)
    real_load = prediction.load_exported
    prediction.load_exported = forward_timer(timers)
    try:
        with instrumented(timers):
            start = time.perf_counter()
            prediction.predict_slides(model, [slide], out, device="cpu", read=read, heatmap=heatmap, progress=False)
            wall = time.perf_counter() - start
    finally:
        prediction.load_exported = real_load
    stages = dict(timers.seconds)
    stages["read and decode"] = min(decode, stages.get("read", 0.0))
    stages["resample"] = stages.pop("read", 0.0) - stages["read and decode"]
    scaled = sum(count * 1.0 for count in timers.decoded.values())
    return {
        "slide": stages.pop("slide"),
        "wall": wall,
        "stages": stages,
        "decoded_fraction": scaled / max(1, timers.window_px),
    }


def config_name(model: str, read: str, heatmap: bool) -> str:
    return f"{model}|{read}|{'heat maps' if heatmap else 'default'}"


def ratios(results: dict[str, list[dict]]) -> dict[str, float]:
    """Each configuration's per-slide rate over the teacher's reading level 0 with the same outputs, per round."""
    out = {}
    for key, runs in results.items():
        _, _, outputs = key.split("|")
        base = results[config_name("teacher 10x", "level0", outputs == "heat maps")]
        out[key] = statistics.median(b["slide"] / r["slide"] for b, r in zip(base, runs))
    return out


def table(results: dict[str, list[dict]], rounds: int) -> str:
    head = "| model | read | outputs | slides/hour/core (x teacher level 0) | s/slide (range) | "
    rows = [head + " | ".join(STAGES) + " | fixed s | px decoded / level-0 px |"]
    rows.append("|---" * (7 + len(STAGES)) + "|")
    for key, ratio in ratios(results).items():
        runs = results[key]
        name, read, outputs = key.split("|")
        med, low, high = median_spread([r["slide"] for r in runs])
        stages = [statistics.median(r["stages"].get(s, 0.0) for r in runs) for s in STAGES]
        fixed = statistics.median(r["wall"] - r["slide"] for r in runs)
        fraction = statistics.median(r["decoded_fraction"] for r in runs)
        rows.append(
            f"| {name} | {read} | {outputs} | {3600 / med:,.0f} ({ratio:.1f}x) | {med:.2f} ({low:.2f}-{high:.2f}) | "
            + " | ".join(f"{s:.2f}" for s in stages)
            + f" | {fixed:.2f} | {fraction:.4g} |"
        )
    note = (
        f"\n\nMedians of {rounds} interleaved round(s); s/slide is the marginal cost (inside `predict_slide`), stage "
        "seconds per slide; 'fixed' is the rest of one `predict_slides` call (model load, records)."
    )
    return "\n".join(rows) + note


def profile_slide(slide: Path, model: Path, out: Path, top: int = 24) -> str:
    """Where a student's slide goes, by function (cumulative seconds inside `predict_slide`)."""
    import cProfile
    import io
    import pstats

    exported = prediction.load_exported(model)
    options = check_options(PredictOptions(read="pyramid"), exported)
    exported.min_side  # noqa: B018 -- probed once, outside the slide's time
    profiler = cProfile.Profile()
    profiler.enable()
    prediction.predict_slide(exported, slide, out, options)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats("hpcdistill|contourpy|shapely", top)
    lines = [ln for ln in stream.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "```\n" + "\n".join(lines[start : start + top + 1]) + "\n```"


def commit() -> str:
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain", "hpcdistill"], capture_output=True, text=True, cwd=REPO)
    except OSError:
        return "unknown"
    return sha.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def run_rounds(slides: dict[str, Path], models: dict[str, Path], configs: list, rounds: int, scratch: Path) -> dict:
    results: dict[str, dict[str, list[dict]]] = {p: defaultdict(list) for p in slides}
    for r in range(rounds):
        for pyramid, slide in slides.items():
            for model, read, heatmap in configs:
                run = one_run(slide, models[model], read, heatmap, scratch / f"{r}-{pyramid}-{model}-{read}-{heatmap}")
                results[pyramid][config_name(model, read, heatmap)].append(run)
                print(f"round {r}: {pyramid} {model} {read} heat maps {heatmap}: {run['slide']:.2f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="40960x30720", help="level-0 WIDTHxHEIGHT of the 40x bench slides")
    parser.add_argument("--quick", action="store_true", help="one 16384x12288 render slide, one round, ratios only")
    parser.add_argument("--cache", default=str(REPO / "bench" / "out"), help="where the slides and models are kept")
    parser.add_argument("--out", default=str(REPO / "bench" / "results_predict.md"))
    args = parser.parse_args()
    pyvips.cache_set_max(0)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    size = (16384, 12288) if args.quick else tuple(int(v) for v in args.size.split("x"))
    pyramids = ("render",) if args.quick else PYRAMIDS
    slides = {p: bench_slide(cache, size, p) for p in pyramids}
    models = {name: bench_model(cache, name) for name in MODELS}
    configs = [c for c in CONFIGS if not args.quick or (c[1], c[2]) in (("level0", False), ("pyramid", False))]
    with tempfile.TemporaryDirectory() as scratch:
        results = run_rounds(slides, models, configs, 1 if args.quick else args.rounds, Path(scratch))
        profile = "" if args.quick else profile_slide(slides["scanner"], models["student 1.25x"], Path(scratch) / "p")
    if args.quick:
        for key, ratio in ratios(results["render"]).items():
            print(f"{key.replace('|', ' ')}: {ratio:.1f}x the teacher reading level 0")
        return
    text = f"# predict on 40x slides\n\n{describe()}; commit {commit()}\n\n"
    for pyramid, slide in slides.items():
        with open_slide(slide) as s:
            levels = ", ".join(f"{lv.width}x{lv.height} ({mag_name(lv.magnification(40))})" for lv in s.levels())
        text += f"## {pyramid} pyramid: {slide.name}, levels {levels}\n\n{table(results[pyramid], args.rounds)}\n\n"
    text += "## Profile: student 1.25x, pyramid, default outputs, scanner slide (cumulative s, one slide)\n\n"
    publish(text + profile + "\n", args.out)


if __name__ == "__main__":
    main()
