"""Atomic, resumable shard writing: samples streamed into size-capped `{split}-{NNNNNN}.tar` files (written as
`.name.tmp`, renamed when complete), the journal of completed shards, and the checks on an output folder a rerun
resumes into. Equal inputs give equal bytes."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

from hpcdistill.cluster.task_array import TASKS
from hpcdistill.common.errors import ShardingError
from hpcdistill.common.files import atomic_write_bytes, fsync_dir, tmp_path
from hpcdistill.common.output_folder import check_links, input_at, within
from hpcdistill.shards.cut import SPOOL, Sample, SlideResult
from hpcdistill.shards.manifest import MANIFEST
from hpcdistill.shards.plan import ShardParams

JOURNAL = ".progress.json"
PART = "part.json"  # a finished array task's partial manifest: its slides' records and its shards
_TAR_BLOCK = 512


_TAR_END = 2 * _TAR_BLOCK


def _tar_member_size(payload_len: int) -> int:
    return _TAR_BLOCK + math.ceil(payload_len / _TAR_BLOCK) * _TAR_BLOCK


def _tar_file_size(members_bytes: int) -> int:
    """tarfile ends an archive with two zero blocks and pads it to whole 10240-byte records."""
    return math.ceil((members_bytes + _TAR_END) / tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def sample_tar_size(sample: Sample) -> int:
    return sum(_tar_member_size(length) for _, _, length in sample.files)


def append_sample(archive: tarfile.TarFile, key: str, payloads: list[tuple[str, bytes]]) -> None:
    """One sample as tar members with fixed mtime/uid/gid/names/mode, so equal inputs give equal bytes."""
    for ext, data in payloads:
        member = tarfile.TarInfo(f"{key}.{ext}")
        member.size, member.mtime, member.mode = len(data), 0, 0o644
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        archive.addfile(member, io.BytesIO(data))


class _OpenShard:
    """A shard being written straight to `.{name}.tmp` (so memory holds one sample); renamed when complete."""

    def __init__(self, out: Path, split: str, index: int, tag: str = ""):
        self.split, self.name = split, f"{split}-{tag}{index:06d}.tar"
        self.path = out / self.name
        self.keys: list[str] = []
        self.nbytes = 0  # tar member bytes so far
        self.slides_ending_here: list[str] = []
        self._handle = open(tmp_path(self.path), "wb")
        self._archive = tarfile.open(fileobj=self._handle, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, sample: Sample, spool: io.BufferedReader) -> None:
        payloads = []
        for ext, offset, length in sample.files:
            spool.seek(offset)
            payloads.append((ext, spool.read(length)))
        append_sample(self._archive, sample.key, payloads)
        self.keys.append(sample.key)
        self.nbytes += sample_tar_size(sample)

    def commit(self) -> int:
        """Finish the tar, fsync, rename into place; returns its size."""
        self._archive.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(tmp_path(self.path), self.path)
        fsync_dir(self.path.parent)
        return self.path.stat().st_size

    def discard(self) -> None:
        """Drop the partial shard. Closing flushes buffered bytes, which fails again on a full disk: that is
        expected here and must not mask the error being handled."""
        try:
            self._handle.close()
        except OSError:
            pass
        tmp_path(self.path).unlink(missing_ok=True)


class ShardWriter:
    """Packs samples into size-capped shards per split, in arrival order; journals every completed shard.

    The journal (`.progress.json`) names each completed shard with its keys, and the slides whose samples are all
    in completed shards (with their manifest records). A rerun skips those slides and those keys and continues with
    the next shard index of each split, so the final shards equal those of an uninterrupted run.
    """

    def __init__(
        self,
        out: Path,
        params: ShardParams,
        fingerprint: dict[str, Any],
        journal: dict[str, Any] | None,
        journal_path: Path | None = None,
        tag: str = "",
    ):
        """`tag` goes into shard names (`train-t003-000000.tar`) and `journal_path` (default `out`/.progress.json)
        is where this writer's journal lives: several writers (array tasks) can share one output folder."""
        self.out, self.params, self.tag = out, params, tag
        self.journal_path = journal_path or out / JOURNAL
        self.journal = journal or {"params": fingerprint, "shards": {}, "slides": {}}
        self.done_keys = {k for entry in self.journal["shards"].values() for k in entry["keys"]}
        self.open: dict[str, _OpenShard] = {}
        self.pending_records: dict[str, dict[str, Any]] = {}

    def _new_shard(self, split: str) -> _OpenShard:
        index = sum(1 for entry in self.journal["shards"].values() if entry["split"] == split)
        return self.open.setdefault(split, _OpenShard(self.out, split, index, self.tag))

    def add_slide(self, result: SlideResult, record: dict[str, Any]) -> None:
        todo = [s for s in result.samples if s.key not in self.done_keys]
        if not todo:  # nothing (left) to write: done as soon as seen
            if result.spool:
                Path(result.spool).unlink(missing_ok=True)
            self.journal["slides"][result.slide] = record
            return
        split = result.split
        assert split is not None and result.spool is not None
        shard = self.open.get(split)
        try:
            with open(result.spool, "rb") as spool:
                for sample in todo:
                    size = sample_tar_size(sample)
                    if (
                        shard is not None
                        and shard.keys
                        and (
                            _tar_file_size(shard.nbytes + size) > self.params.shard_size
                            or len(shard.keys) >= (self.params.shard_max_samples or math.inf)
                        )
                    ):
                        self._close(split)
                        shard = None
                    shard = shard or self._new_shard(split)
                    shard.add(sample, spool)
        except OSError as exc:
            raise disk_error(exc, self.out, shard.name if shard else result.spool) from None
        Path(result.spool).unlink()
        self.pending_records[result.slide] = record
        shard.slides_ending_here.append(result.slide)

    def _close(self, split: str) -> None:
        shard = self.open.pop(split)
        try:
            nbytes = shard.commit()
        except OSError as exc:
            shard.discard()
            raise disk_error(exc, self.out, shard.name) from None
        self.journal["shards"][shard.name] = {"split": split, "bytes": nbytes, "keys": shard.keys}
        for slide in shard.slides_ending_here:
            self.journal["slides"][slide] = self.pending_records.pop(slide)
        self.done_keys.update(shard.keys)
        self.save_journal()

    def save_journal(self) -> None:
        try:
            atomic_write_bytes(self.journal_path, json.dumps(self.journal, sort_keys=True).encode("utf-8"))
        except OSError as exc:
            raise disk_error(exc, self.out, self.journal_path.name) from None

    def finish(self) -> None:
        for split in sorted(self.open):
            self._close(split)
        self.save_journal()

    def abandon(self) -> None:
        """After an error: drop the partial shards (completed ones and the journal stay)."""
        for shard in self.open.values():
            shard.discard()
        self.open.clear()


def disk_error(exc: OSError, out: Path, name: str) -> ShardingError:
    if exc.errno == errno.ENOSPC:
        return ShardingError(
            f"{out}: disk full while writing {name}; completed shards are kept, "
            "free some space and rerun the same command to resume"
        )
    return ShardingError(f"{out / name}: cannot write ({exc.strerror or exc})")


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return (
            [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
            if old != new
            else []
        )
    return [prefix.rstrip(".")] if old != new else []


def create_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShardingError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None


def remove_partial_files(out: Path, spool_dir: Path, tag: str | None = None, slides: list[str] | None = None) -> None:
    """Temporaries of an interrupted run (killed, or stopped by a full disk): never complete by construction. An
    array task (`tag`, its `slides`) removes only its own: the other tasks write into the same folder meanwhile."""
    if tag is None:
        stale = [*out.glob(".*.tmp"), *((out / "qc").glob("*.partial") if (out / "qc").is_dir() else [])]
    else:
        stale = [*out.glob(f".*-{tag}*.tar.tmp"), *[out / "qc" / f"{slide}.png.partial" for slide in slides or []]]
    for path in stale:
        path.unlink(missing_ok=True)
    shutil.rmtree(spool_dir, ignore_errors=True)


def read_matching(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """A journal, partial manifest or manifest written with these parameters; None if absent. One written with other
    parameters, or unreadable, is refused in one line naming the folder and the differing parameters."""
    if not path.exists():
        return None
    try:
        previous = json.loads(path.read_text())
        old_params = previous["params"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ShardingError(f"{path}: unreadable; use a new --out folder or --overwrite") from None
    diff = _differences(old_params, fingerprint)
    if diff:
        raise ShardingError(
            f"{path.parent}: holds shards made with different parameters ({', '.join(diff)}); "
            "use a new --out folder or --overwrite"
        )
    return previous


def check_journalled(out: Path, journal: dict[str, Any]) -> dict[str, Any]:
    """The journal, once every shard it names is in `out` with the size it had when journalled."""
    for shard, entry in journal["shards"].items():
        if not (out / shard).is_file() or (out / shard).stat().st_size != entry["bytes"]:
            raise ShardingError(
                f"{out / shard}: missing or changed since it was journalled; use --overwrite to start again"
            )
    return journal


def _listed_names(record: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(shard file names, slide ids) a manifest, journal or task record lists; only plain names count (a listed
    `../x.tar` is not a file this folder's run wrote)."""
    shards = set(record.get("shards") or {})  # a journal's or a task's: {name: entry}
    for split in (record.get("splits") or {}).values():
        shards |= set(split.get("shards") or [])  # a manifest's
    rows = record.get("slides") or {}  # {slide: record}, or a dry run's plan: [{"slide": ...}, ...]
    slides = set(rows) if isinstance(rows, dict) else {r.get("slide") for r in rows if isinstance(r, dict)}
    return {n for n in shards if _plain(n)}, {s for s in slides if _plain(s)}


def _plain(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and Path(name).name == name and name not in (".", "..")


def _records(out: Path) -> list[dict[str, Any]]:
    """Every record of what a run wrote here: manifest, journal, and each array task's journal and partial manifest."""
    tasks = sorted((out / TASKS).glob("t[0-9][0-9][0-9]")) if (out / TASKS).is_dir() else []
    found = []
    own = [out / MANIFEST, out / JOURNAL, out / "plan.json"]
    for path in [*own, *(t / n for t in tasks for n in (PART, JOURNAL))]:
        try:
            record = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            record = None  # unreadable: it names nothing, and is removed itself below
        found += [record] if isinstance(record, dict) else []
    return found


def clear_output(out: Path, inputs: list[Path]) -> int:
    """--overwrite: what an earlier run wrote here goes (the shards and QC images its manifest, journal and task
    records list, with the outlines beside the QC images, those records, its temporaries and task folders), nothing
    else: never an input of this run (`inputs`: e.g. the qc/ outlines edited in QuPath, given back as --rois), never
    through a link out of the folder (each path resolved; the callers refuse a linked qc/ or tasks/ before this).
    Returns how many files went."""
    shards, slides = set(), set()
    for record in _records(out):
        names, ids = _listed_names(record)
        shards, slides = shards | names, slides | ids
    files = [out / n for n in sorted(shards)]
    files += [out / "qc" / f"{s}{ext}" for s in sorted(slides) for ext in (".png", ".geojson")]
    files += [*out.glob(".*.tmp"), out / JOURNAL, out / MANIFEST, out / "plan.json"]
    removed, kept = 0, [p for p in files if p.is_file() and input_at(p, inputs) is not None]
    for path in files:
        if path.is_file() and path not in kept and within(path, out):
            path.unlink()
            removed += 1
    if kept:
        print(
            f"hpcdistill: --overwrite: kept {len(kept)} file(s) that are inputs of this run (first: {kept[0]})",
            file=sys.stderr,
        )
    for task in sorted((out / TASKS).glob("t[0-9][0-9][0-9]")) if (out / TASKS).is_dir() else []:
        removed += sum(1 for p in task.rglob("*") if p.is_file())
        shutil.rmtree(task)
    with contextlib.suppress(OSError):
        (out / TASKS).rmdir()  # only when empty: a file of the user's in it stays
    print(f"hpcdistill: --overwrite: removed {removed} files an earlier run wrote in {out}", file=sys.stderr)
    return removed


def prepare_output(
    out: Path, fingerprint: dict[str, Any], overwrite: bool, inputs: list[Path]
) -> tuple[dict | None, dict | None]:
    """Check the folder for a single-process run: returns (journal to resume, finished manifest), at most one not
    None. Folders made with other parameters, or by an array of tasks still unmerged, are refused."""
    create_output_folder(out)
    check_links(out, ["qc", TASKS, SPOOL])
    if overwrite:
        clear_output(out, inputs)
    remove_partial_files(out, out / SPOOL)
    journal = read_matching(out / JOURNAL, fingerprint)
    if journal is not None:
        return check_journalled(out, journal), None
    manifest = read_matching(out / MANIFEST, fingerprint)
    if manifest is not None:
        return None, manifest
    if (out / TASKS).is_dir() and any((out / TASKS).glob("t[0-9][0-9][0-9]")):  # a task folder, not any file
        raise ShardingError(
            f"{out}: holds the shards of an unfinished array of tasks ({TASKS}/); rerun it with the "
            "same --cluster/--tasks, or use --overwrite"
        )
    if any(out.glob("*.tar")) and not overwrite:  # after --overwrite, the .tar files left are none of ours
        raise ShardingError(
            f"{out}: holds shards with no {JOURNAL} or {MANIFEST} (unknown parameters); "
            "use a new --out folder or --overwrite"
        )
    return None, None
