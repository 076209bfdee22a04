"""One writer per output folder. A command that writes a run, shard, prediction, evaluation or experiment folder
holds an exclusive lock on `<folder>/.hpcdistill.lock` for its lifetime; a second writer is refused in one line
naming the holder (host, pid, command, since when).

The lock is an OS lock (filelock's `flock`), not a file's existence: the kernel (or the NFS server) drops it when the
holder dies, so a killed run, a preempted job or a SLURM requeue never finds a stale lock. On NFS, Linux emulates
flock with NFS byte-range locks, which the server releases when the client's lease ends; Lustre needs the `flock`
mount option. Where the filesystem has no locking at all, the check is off and the command says so (it never falls
back to a lock file that a killed process would leave behind)."""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcdistill.common.console import say
from hpcdistill.common.errors import FolderBusy
from hpcdistill.common.files import atomic_write_json

LOCK = ".hpcdistill.lock"
HOLDER = ".hpcdistill.writer.json"  # who holds the lock: read by the writer that is refused


def holder_line(folder: Path) -> str:
    """'host h, pid p, since 12:03:04 UTC (hpcdistill train ...)' of the lock's holder, as it recorded itself."""
    try:
        who = json.loads((folder / HOLDER).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(who["since"]))
        return f"host {who['host']}, pid {who['pid']}, since {since} ({who['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"


def busy(folder: Path) -> FolderBusy:
    return FolderBusy(
        f"{folder}: another hpcdistill is writing here: {holder_line(folder)}; wait for it to end or write "
        "elsewhere (a killed run holds nothing: rerun then)"
    )


@contextmanager
def one_writer(folder: str | Path) -> Iterator[None]:
    """Hold `folder` (created if missing) for the block; refuse in one line if another process holds it."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK, timeout=0, fallback_to_soft=False)
    try:
        lock.acquire()
    except Timeout:
        raise busy(folder) from None
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        say(f"{folder}: this filesystem has no file locking; two writers here would not be stopped")
        yield
        return
    try:
        command = " ".join(["hpcdistill", *sys.argv[1:]])[:300]
        atomic_write_json(
            folder / HOLDER,
            {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "command": command},
        )
        yield
    finally:
        (folder / HOLDER).unlink(missing_ok=True)
        lock.release()


def folder_held(folder: str | Path) -> bool:
    """True while a live process holds `folder` (a probe: takes the lock for an instant when it is free)."""
    from filelock import FileLock, Timeout

    path = Path(folder) / LOCK
    if not path.is_file():
        return False
    lock = FileLock(path, timeout=0, fallback_to_soft=False)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:
        return False  # no locking on this filesystem: nothing can be told
    lock.release()
    return False
