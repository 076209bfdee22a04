"""What a command may remove or write in its output folder: only what an earlier hpcdistill run wrote there, never
an input of the command, and never through a symbolic link that leaves the folder.

A folder is the toolkit's when it holds the lock file every writing command leaves (`.hpcdistill.lock`); any other
non-empty folder is foreign, and nothing in it is taken for a result to replace. Every path is resolved before it is
compared or removed."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.common.folder_lock import LOCK, busy, folder_held


def within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path`, resolved (links followed), is `folder` or lies under it."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def input_at(path: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> Path | None:
    """The input of the command that `path` is, or lies under (a file in an input folder); None if none."""
    resolved = Path(path).resolve()
    return next((Path(i) for i in inputs if within(resolved, i)), None)


def check_links(out: str | os.PathLike, names: Iterable[str]) -> None:
    """Refuse in one line an entry of `out` that this command writes (a file or a folder of its outputs) which is a
    symbolic link leading out of `out`: writing through it would replace a file elsewhere."""
    out = Path(out)
    for name in names:
        entry = out / name
        if entry.is_symlink() and not within(entry, out):
            raise HpcdistillError(
                f"{entry}: a symbolic link to {entry.resolve()}, outside --out; this command writes there: remove the "
                "link, or write to another --out"
            )


def check_overwrite(
    folder: str | Path, finished: Iterable[str], overwrite: bool, inputs: Iterable[str | os.PathLike] = ()
) -> list[Path]:
    """The files of a finished earlier result in `folder` (names in `finished`) that `overwrite` will replace.
    Without it, refused in one line; refused with it too when the folder is foreign (no lock file: no hpcdistill
    command wrote it), when a file to replace is an input of this command, or while another process holds it. A
    folder left by an interrupted run (lock file, no finished result) is taken as is: rerunning the command goes on."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    check_links(folder, finished)
    done = [folder / name for name in finished if (folder / name).exists()]
    if not (folder / LOCK).exists() and any(folder.iterdir()):
        raise HpcdistillError(
            f"{folder}: holds files no hpcdistill command wrote (no {LOCK}); --overwrite replaces only an earlier "
            "hpcdistill result: write to a new or empty --out"
        )
    for path in done:
        source = input_at(path, inputs)
        if source is not None:
            raise HpcdistillError(
                f"{source}: an input of this command, in --out {folder} where it writes {path.name}; move the input "
                "out of the folder, or write to another --out"
            )
    if overwrite and done and folder_held(folder):
        raise busy(folder)  # before anything is removed: the holder's refusal would come after the loss
    if overwrite or not done:
        return done
    raise HpcdistillError(
        f"{folder}: holds a finished result ({', '.join(p.name for p in done)}); pass --overwrite to replace it, or "
        "write to another --out"
    )
