"""How a result was made, in one record every output carries (run folder, export and checkpoint, evaluation JSON,
prediction folder, shard manifest, report): the package version and, run from a git checkout, its commit and
whether the tree had uncommitted changes; the versions of Python and of the libraries the numbers depend on; the
host, the command line, the SLURM job, array and task when there is one, and the time. Read from installed package
metadata and the environment: nothing here imports torch or libvips."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

PROVENANCE = "provenance.json"  # the file name where a folder keeps it beside its results
# distribution name -> the key it is recorded under; pyvips-binary's version is that of the libvips it bundles
LIBRARIES = {
    "torch": "torch",
    "deepspeed": "deepspeed",
    "numpy": "numpy",
    "pyvips": "pyvips",
    "pyvips-binary": "libvips (pyvips-binary)",
    "openslide-python": "openslide-python",
    "openslide-bin": "openslide (openslide-bin)",
    "webdataset": "webdataset",
    "pillow": "pillow",
    "scipy": "scipy",
}
SLURM_IDS = {
    "SLURM_JOB_ID": "job",
    "SLURM_ARRAY_JOB_ID": "array_job",
    "SLURM_ARRAY_TASK_ID": "array_task",
    "SLURM_PROCID": "rank",
    "SLURM_JOB_NODELIST": "nodes",
    "SLURM_CLUSTER_NAME": "cluster",
    "SLURM_RESTART_COUNT": "restarts",
}


_command: list[str] = []  # the command line the CLI was given (record_command); else the process's argv


def record_command(argv: list[str]) -> None:
    """The command this process runs, as the user typed it (`hpcdistill train c.yaml ...`), for every record."""
    _command[:] = [str(word) for word in argv]


def current_command() -> list[str]:
    """The command line the records name: the CLI's (record_command), else this process's argv."""
    return list(_command) or ([Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else [])


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def source_commit() -> dict[str, Any] | None:
    """{"commit", "dirty"} of the checkout the package runs from; None for an installed wheel (no .git above it) or
    where git is unavailable. Cached: the tree is read once per process."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        run = lambda *args: subprocess.run(  # noqa: E731
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    """The record (see the module docstring); `git` is None outside a checkout, `slurm` None outside a job."""
    slurm = {key: os.environ[var] for var, key in SLURM_IDS.items() if os.environ.get(var)}
    return {
        "hpcdistill": _version("hpcdistill"),
        "git": source_commit(),
        "python": platform.python_version(),
        "libraries": {key: _version(dist) for dist, key in LIBRARIES.items()},
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "command": current_command(),
        "cwd": os.getcwd(),
        "slurm": slurm or None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe_provenance(record: dict[str, Any]) -> str:
    """'hpcdistill 0.4.0 (commit 1a2b3c4d, uncommitted changes), torch 2.13.0, deepspeed 0.19.8': what a report
    prints per run."""
    git = record.get("git") or {}
    commit = f" (commit {git['commit'][:8]}{', uncommitted changes' if git.get('dirty') else ''})" if git else ""
    libraries = record.get("libraries") or {}
    pinned = ", ".join(f"{k} {libraries[k]}" for k in ("torch", "deepspeed") if libraries.get(k))
    return f"hpcdistill {record.get('hpcdistill')}{commit}" + (f", {pinned}" if pinned else "")
