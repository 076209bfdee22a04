"""`hpcdistill shard`: slides -> aligned multi-magnification WebDataset shards, and its dry run.

Flow: collect slide files and labels (slides/catalog.py) -> the plan (plan.py) -> per slide, in worker processes,
cut every tissue window at every magnification into a spool file (cut.py) -> this process consumes results in plan
order and streams them into shards, journalling each completed one (writer.py) -> the manifest (manifest.py).
Memory holds one window's pixels per worker, whatever the slide or shard size.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import errno
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import hpcdistill
from hpcdistill.common.errors import ShardingError
from hpcdistill.common.files import atomic_write_bytes, atomic_write_json
from hpcdistill.common.folder_lock import one_writer
from hpcdistill.common.signals import Interrupted, check_interrupted, ignore_interrupts
from hpcdistill.shards.cut import SPOOL, SlideResult, preview_slide, shard_slide
from hpcdistill.shards.manifest import MANIFEST, build_manifest, default_dataset_name
from hpcdistill.shards.plan import ShardParams, SlideJob, make_plan, params_fingerprint, shard_inputs
from hpcdistill.shards.writer import (
    JOURNAL,
    ShardWriter,
    create_output_folder,
    disk_error,
    prepare_output,
    remove_partial_files,
)
from hpcdistill.slides.catalog import collect_slides

__all__ = ["ShardParams", "ShardingError", "preview_sharding", "run_sharding"]


def _spawn_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    context = multiprocessing.get_context("spawn")  # fork + libvips threads can deadlock
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=ignore_interrupts)


def _stop_workers(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """On a signal: the workers ignore it (one line from the parent, not a traceback each), so end them here rather
    than wait for the slides in hand; their spool files go with the next run's clean-up."""
    pool.shutdown(wait=False, cancel_futures=True)
    for process in list((pool._processes or {}).values()):  # no public way before Python 3.14's kill_workers
        process.kill()  # SIGKILL: they ignore SIGTERM


def _plan_summary(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, dict[str, Any]]:
    """Per split of the dry run: slides, patients, tissues, samples and slides per class."""
    splits: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        entry = splits.setdefault(
            row["split"],
            {"slides": 0, "patients": set(), "tissues": 0, "samples": 0, "class_slides": {c: 0 for c in classes}},
        )
        entry["slides"] += 1
        entry["patients"].add(row["patient"])
        entry["tissues"] += row["tissues"]
        entry["samples"] += row["samples"]
        if row["label"]:
            entry["class_slides"][row["label"]] += 1
    for entry in splits.values():
        entry["patients"] = len(entry["patients"])
    return dict(sorted(splits.items()))


def preview_sharding(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    labels_csv: str | None = None,
    params: ShardParams | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """What `shard` would cut, without cutting: per slide its split, label, base magnification, tissues and samples
    (or why it would be skipped), per split the counts. Writes only `out`/qc/*.png and `out`/plan.json, so tissue
    parameters can be checked on the QC images before a long run; a later `shard` into `out` is unaffected."""
    params = params or ShardParams()
    out = Path(out)
    jobs, classes = make_plan(collect_slides(inputs), labels_csv, params)
    create_output_folder(out)
    (out / "qc").mkdir(exist_ok=True)
    if workers > 1:
        with _spawn_pool(workers) as pool:
            rows = list(pool.map(preview_slide, jobs, [params] * len(jobs), [str(out / "qc")] * len(jobs)))
    else:
        rows = [preview_slide(job, params, str(out / "qc")) for job in jobs]
    plan = {
        "tool": "hpcdistill",
        "version": hpcdistill.__version__,
        "classes": classes,
        "mags": [float(m) for m in params.mags],
        "splits": _plan_summary(rows, classes),
        "slides": rows,
    }
    atomic_write_json(out / "plan.json", plan, indent=1)
    return plan


def _wants_stats(job: SlideJob, params: ShardParams) -> bool:
    """Colour statistics come from the labeled train split only (labelled by the CSV or by regions)."""
    return job.split == "train" and (job.class_id is not None or params.rois.labels)


def _results_in_order(
    jobs: list[SlideJob], params: ShardParams, out: str, workers: int, spool: str
) -> Iterator[tuple[SlideJob, SlideResult]]:
    """Slides run in parallel, results come back in plan order, at most 2*workers in flight (bounded memory)."""
    if workers <= 1:
        for job in jobs:
            result = shard_slide(job, params, out, _wants_stats(job, params), spool)
            check_interrupted()
            yield job, result
        return
    with _spawn_pool(workers) as pool:
        queue: collections.deque = collections.deque()
        remaining = iter(jobs)
        for job in remaining:
            queue.append((job, pool.submit(shard_slide, job, params, out, _wants_stats(job, params), spool)))
            if len(queue) >= 2 * workers:
                break
        try:
            while queue:
                job, future = queue.popleft()
                next_job = next(remaining, None)
                if next_job is not None:
                    stats = _wants_stats(next_job, params)
                    queue.append((next_job, pool.submit(shard_slide, next_job, params, out, stats, spool)))
                try:
                    result = future.result()
                    check_interrupted()  # a Ctrl-C inside a libvips callback is swallowed there, not here
                except Interrupted:
                    _stop_workers(pool)
                    raise
                except concurrent.futures.process.BrokenProcessPool:
                    raise ShardingError(
                        f"{job.path}: a worker process died while sharding it (crash or out of "
                        "memory); completed shards are kept; check or remove this slide, then rerun"
                    ) from None
                yield job, result
        finally:  # stopped early (an error, a full disk): queued slides must not start writing spool files
            for _, future in queue:
                future.cancel()


def write_slides(
    out: Path,
    writer: ShardWriter,
    jobs: list[SlideJob],
    params: ShardParams,
    workers: int,
    progress: bool | None,
    spool: Path,
    clean_up: Callable[[], None],
    on_slide: Callable[[int, int], None] | None = None,
) -> None:
    """Cut the slides the journal does not hold yet and stream them into shards (`on_slide(done, total)` after
    each). Whatever stops it, completed shards and the journal stay; `clean_up` removes the partial files."""
    from tqdm import tqdm

    todo = [job for job in jobs if job.slide not in writer.journal["slides"]]
    bar = tqdm(
        total=len(jobs),
        initial=len(jobs) - len(todo),
        unit="slide",
        desc="shard",
        disable=None if progress is None else not progress,
        file=sys.stderr,
    )
    results = _results_in_order(todo, params, str(out), workers, str(spool))
    try:
        spool.mkdir(parents=True)
        (out / "qc").mkdir(exist_ok=True)
        with bar:
            for done, (job, result) in enumerate(results, len(jobs) - len(todo) + 1):
                if result.status != "ok":
                    bar.write(f"hpcdistill: skipped {result.reason}", file=sys.stderr)
                writer.add_slide(result, result.record(job))
                bar.update(1)
                if on_slide is not None:
                    on_slide(done, len(jobs))
        writer.finish()
    except OSError as exc:  # from a worker (spool, QC image); the writer's own errors are already ShardingErrors
        if exc.errno != errno.ENOSPC:
            raise
        raise disk_error(exc, out, "a slide's samples") from None
    finally:
        results.close()  # waits for the slides in flight, so none writes after the clean-up
        writer.abandon()
        clean_up()


def check_skipped(out: Path, manifest: dict[str, Any], strict: bool) -> None:
    skipped = [(name, s["reason"]) for name, s in manifest["slides"].items() if s["status"] != "ok"]
    if len(skipped) == len(manifest["slides"]):
        raise ShardingError(
            f"{out}: nothing could be sharded: all {len(skipped)} slide(s) skipped (first: {skipped[0][1]})"
        )
    if strict and skipped:
        raise ShardingError(f"{out}: --strict: {len(skipped)} slide(s) skipped (first: {skipped[0][1]})")


def run_sharding(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    labels_csv: str | None = None,
    params: ShardParams | None = None,
    workers: int = 1,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool | None = None,
    name: str = "",
) -> dict[str, Any]:
    """Shard slides into `out`; returns the manifest. Raises ShardingError when nothing could be sharded or,
    under `strict`, when any slide was skipped (after writing everything that could be written). `name`: the
    dataset's name in reports (default: the folder's)."""
    params = params or ShardParams()
    out = Path(out)
    slide_paths = collect_slides(inputs)
    jobs, classes = make_plan(slide_paths, labels_csv, params)
    fingerprint = params_fingerprint(params, slide_paths, labels_csv)
    create_output_folder(out)
    with one_writer(out):
        inputs = shard_inputs(slide_paths, labels_csv, params) if overwrite else []
        journal, finished = prepare_output(out, fingerprint, overwrite, inputs)
        earlier = (journal, finished)
        name = name or default_dataset_name(out)
        return _shard_into(out, jobs, classes, params, fingerprint, earlier, workers, strict, progress, name)


def _shard_into(
    out: Path,
    jobs: list[SlideJob],
    classes: list[str],
    params: ShardParams,
    fingerprint: dict[str, Any],
    earlier: tuple[dict | None, dict | None],
    workers: int,
    strict: bool,
    progress: bool | None,
    name: str,
) -> dict[str, Any]:
    """run_sharding's work, once the folder is held and checked (`earlier`: the journal to resume, or the finished
    manifest)."""
    journal, finished = earlier
    if finished is not None:
        print(f"hpcdistill: {out}: already complete with these parameters; nothing to do", file=sys.stderr)
        manifest = finished
    else:
        writer = ShardWriter(out, params, fingerprint, journal)
        write_slides(
            out, writer, jobs, params, workers, progress, out / SPOOL, lambda: remove_partial_files(out, out / SPOOL)
        )
        slides, shards = writer.journal["slides"], writer.journal["shards"]
        manifest = build_manifest(params, fingerprint, classes, jobs, slides, shards, name)
        try:
            atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode())
        except OSError as exc:
            raise disk_error(exc, out, MANIFEST) from None
        (out / JOURNAL).unlink(missing_ok=True)
    check_skipped(out, manifest, strict)
    return manifest
