"""Does stain handling help a model read another hospital's slides, and what does a 7.5% scale error cost (issue 39)?

Site shift: the demo's dataset written at staining site 0 (train, val and a test split) and a test set written at site
1 (`synth --site 1`: each stain's hue and strength shifted as between hospitals). Baseline students (the demo's
recipe) are trained on site 0 at 2.5x and 1.25x in four conditions: plain, with the stain jitter
(`augment.hed=0.1`), and on shards stain-normalised with Macenko or with Reinhard (to a site-0 tile; both sites'
shards normalised alike). Each is scored on both sites' test windows, picked on site-0 validation (best.pt); the
normalisations change pixels, not windows, so every condition is paired with the plain one over (seed, window).

Scale error: a test set of the same scenes written at 0.25 um/px and at 0.2325 um/px (both headers say 40x), the
second sharded by pixel size (the default) and by objective power (the behaviour before); the plain students scored
on both, paired over (seed, tissue window).

    .venv/bin/python studies/site_shift.py [--out runs/study-site-shift] [--seeds 3] [--mags 2.5,1.25] [--quick]

Writes <out>/site_shift.json and studies/results_site_shift.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_sd, pct, plan_for, score_exports  # noqa: E402

from hpcdistill.common.mags import mag_name  # noqa: E402
from hpcdistill.scoring.metrics import paired_bootstrap  # noqa: E402
from hpcdistill.synthetic.dataset import dataset_classes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAGS = (2.5, 1.25)
CONDITIONS = ("plain", "hed", "macenko", "reinhard")
NORM = {"plain": "none", "hed": "none", "macenko": "macenko", "reinhard": "reinhard"}
CLASSES = tuple(sorted(dataset_classes(3)))  # one class order for every folder, test-only ones included
RECIPE = ["train.epochs=80", "data.epoch_samples=64", "train.grad_accum=1"]  # the demo experiment's baseline


def write_data(out: Path, quick: bool) -> dict[str, Path]:
    """The slide folders: site 0 (train, val, test), site 1 (test), and the scale pair (test at two pixel sizes)."""
    from hpcdistill.synthetic.dataset import write_dataset
    from hpcdistill.synthetic.specs import DatasetSpec

    plan = plan_for(quick)
    test = {"train": 0, "val": 0, "test": max(3, plan.slides["test"] // 2)}  # every class in each test set
    specs = {
        "site0": DatasetSpec(slides_per_split={**plan.slides, "test": test["test"]}, aux1=0, aux2=0, size=plan.size),
        "site1": DatasetSpec(slides_per_split=test, aux1=0, aux2=0, size=plan.size, site=1, seed=11),
        "scale-0.25": DatasetSpec(slides_per_split=test, aux1=0, aux2=0, size=plan.size, seed=12),
        "scale-0.2325": DatasetSpec(slides_per_split=test, aux1=0, aux2=0, size=plan.size, seed=12, pixel_um=0.2325),
    }
    folders = {}
    for name, spec in specs.items():
        folders[name] = out / "slides" / name
        if not (folders[name] / "labels.csv").is_file():
            write_dataset(folders[name], spec, workers=2)
    return folders


def shard_all(out: Path, slides: dict[str, Path]) -> dict[str, Path]:
    """Shards per (slides, normalisation), and the 0.2325 um/px test sharded by objective power too."""
    from hpcdistill.shards.sharding import ShardParams, run_sharding
    from hpcdistill.slides.factory import open_slide
    from hpcdistill.slides.mag_scale import OBJECTIVE_SCALE
    from hpcdistill.slides.stain import StainNorm

    tile = out / "site0-tile.png"
    if not tile.is_file():
        from PIL import Image

        first = sorted(slides["site0"].glob("*.svs"))[0]
        with open_slide(first) as slide:
            w, h = slide.info.width, slide.info.height
            Image.fromarray(slide.read_at_mag((0, 0, w, h), 2.5, (round(w / 16), round(h / 16)))).save(tile)
    jobs = {
        f"{site}|{norm}": (slides[site], ShardParams(mags=MAGS, classes=CLASSES, stain=StainNorm.fitted(norm, tile)))
        for site in ("site0", "site1")
        for norm in ("none", "macenko", "reinhard")
    }
    jobs["scale-0.25|mpp"] = (slides["scale-0.25"], ShardParams(mags=MAGS, classes=CLASSES))
    jobs["scale-0.2325|mpp"] = (slides["scale-0.2325"], ShardParams(mags=MAGS, classes=CLASSES))
    jobs["scale-0.2325|objective"] = (
        slides["scale-0.2325"],
        ShardParams(mags=MAGS, classes=CLASSES, mag_scale=OBJECTIVE_SCALE),
    )
    shards = {}
    for key, (folder, params) in jobs.items():
        shards[key] = out / "shards" / key.replace("|", "-")
        if not (shards[key] / "manifest.json").is_file():
            run_sharding(
                [folder], shards[key], labels_csv=str(folder / "labels.csv"), params=params, workers=2, progress=False
            )
    return shards


def train(job: tuple[str, str, float, str, int, bool]) -> str:
    """One student run in its own process; returns its best.pt."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from hpcdistill.config.loading import load_config
    from hpcdistill.train.loop import run

    out, shards, mag, condition, seed, quick = job
    overrides = [f"run.out_dir={out}/runs", f"run.name={condition}-{mag_name(mag)}-s{seed}", f"data.shards={shards}"]
    overrides += [f"run.seed={seed}", f"data.mag={mag}", "log.progress=false", *RECIPE]
    overrides += ["data.augment.hed=0.1"] if condition == "hed" else []
    overrides += list(plan_for(quick).overrides)
    return run(load_config(REPO / "configs/demo/baseline.yaml", overrides))["best_path"]


def pooled(runs: list[dict]) -> dict:
    return {k: [v for r in runs for v in r[k]] for k in ("keys", "y", "pred")} | {"classes": runs[0]["classes"]}


def paired(a: dict, b: dict, iterations: int) -> str:
    """a - b in OvR accuracy, points, with its paired 95% CI, over the same (seed, window) pairs."""
    assert a["keys"] == b["keys"], "paired scores need the same windows"
    diff = paired_bootstrap(a["y"], a["pred"], b["pred"], a["classes"], iterations=iterations)["accuracy"]
    return "{:+.1f} ({:+.1f} to {:+.1f})".format(*(100 * v for v in diff))


def site_table(scores: dict[str, list[dict]], mags: list[float], iterations: int) -> str:
    rows = [
        "| mag | condition | site 0 test | site 1 test | site 1 vs plain (paired 95% CI) |",
        "|---|---|---|---|---|",
    ]
    for mag in mags:
        plain = pooled(scores[f"{mag_name(mag)}|plain|site1"])
        for condition in CONDITIONS:
            cells = []
            for site in ("site0", "site1"):
                mean, sd = mean_sd([r["accuracy"] for r in scores[f"{mag_name(mag)}|{condition}|{site}"]])
                cells.append(f"{pct(mean)} ± {pct(sd)}")
            runs = pooled(scores[f"{mag_name(mag)}|{condition}|site1"])
            diff = paired(runs, plain, iterations) if condition != "plain" else ""
            rows.append(f"| {mag_name(mag)} | {condition} | {cells[0]} | {cells[1]} | {diff} |")
    return "\n".join(rows)


def scale_table(scores: dict[str, list[dict]], mags: list[float], iterations: int) -> str:
    rows = ["| mag | test slides, read by | accuracy | vs 0.25 um/px slides (paired 95% CI) |", "|---|---|---|---|"]
    for mag in mags:
        ref = scores[f"{mag_name(mag)}|scale-0.25|mpp"]
        for key in ("scale-0.25|mpp", "scale-0.2325|mpp", "scale-0.2325|objective"):
            runs = scores[f"{mag_name(mag)}|{key}"]
            mean, sd = mean_sd([r["accuracy"] for r in runs])
            diff = "" if key == "scale-0.25|mpp" else paired(pooled(runs), pooled(ref), iterations)
            slides, basis = key.split("|")
            what = f"{slides.split('-')[1]} um/px, {'pixel size' if basis == 'mpp' else 'objective power'}"
            rows.append(f"| {mag_name(mag)} | {what} | {pct(mean)} ± {pct(sd)} | {diff} |")
    return "\n".join(rows)


def score_all(exports: dict, shards: dict[str, Path]) -> dict[str, list[dict]]:
    """Each condition's students on both sites' test windows (normalised as they were trained), and the plain
    students on the scale pair."""
    scores: dict[str, list[dict]] = {}
    for (mag, condition), paths in exports.items():
        for site in ("site0", "site1"):
            key = f"{mag_name(mag)}|{condition}|{site}"
            scores[key] = score_exports(paths, shards[f"{site}|{NORM[condition]}"], "test", 2)
        if condition == "plain":
            for scale in ("scale-0.25|mpp", "scale-0.2325|mpp", "scale-0.2325|objective"):
                scores[f"{mag_name(mag)}|{scale}"] = score_exports(paths, shards[scale], "test", 2)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "study-site-shift"))
    parser.add_argument("--quick", action="store_true", help="the shortened demo's data and epochs (a smoke run)")
    parser.add_argument("--iterations", type=int, default=10000)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per condition (0, 1, ...)")
    parser.add_argument("--mags", default="2.5,1.25", help="the students' magnifications")
    args = parser.parse_args()
    out, started = Path(args.out), time.monotonic()
    shards = shard_all(out, write_data(out, args.quick))
    mags = [float(m) for m in args.mags.split(",")]
    runs = [(mag, condition, seed) for mag in mags for condition in CONDITIONS for seed in range(args.seeds)]
    jobs = [(str(out), str(shards[f"site0|{NORM[c]}"]), mag, c, seed, args.quick) for mag, c, seed in runs]
    with ProcessPoolExecutor(2) as pool:
        bests = [Path(best) for best in pool.map(train, jobs)]
    exports: dict = {}
    for (mag, condition, _), best in zip(runs, bests):
        exports.setdefault((mag, condition), []).append(best)
    scores = score_all(exports, shards)
    minutes = (time.monotonic() - started) / 60
    summary = {k: [{"export": r["export"], "accuracy": r["accuracy"]} for r in v] for k, v in scores.items()}
    (out / "site_shift.json").write_text(json.dumps(summary, indent=1))
    windows = len(scores[f"{mag_name(mags[0])}|plain|site1"][0]["y"])
    body = (
        "# Site shift and scale error: OvR accuracy (paper), baseline students\n\n## Trained at site 0, tested at "
        "both sites\n\n"
        + site_table(scores, mags, args.iterations)
        + "\n\n## A 7.5% pixel-size error\n\n"
        + scale_table(scores, mags, args.iterations)
        + f"\n\n{args.seeds} training seeds per condition, {windows} site-1 test windows; differences paired over "
        f"(seed, window), {args.iterations:,} bootstrap resamples; {minutes:.0f} min on this machine "
        f"(`.venv/bin/python studies/site_shift.py --seeds {args.seeds} --mags {args.mags}`).\n"
    )
    print(body)
    if not args.quick:
        (REPO / "studies" / "results_site_shift.md").write_text(body)


if __name__ == "__main__":
    main()
