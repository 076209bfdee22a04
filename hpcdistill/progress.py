"""Training progress: the run folder's progress.json (written by the engine through `RunFolder`, read here without
torch, so the launcher can show it), and what a launch's jobs are doing for a person at a terminal: one line per
task with its epoch, step and ETA. On a TTY the lines are redrawn in place; otherwise a line is printed whenever a
task reaches a new epoch or phase, so logs stay readable."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

PROGRESS = "progress.json"  # {"mode", "phase", "epoch", "epochs", "step", "steps", "eta_s", "updated"}


def write_progress(run_dir: Path, progress: dict[str, Any]) -> None:
    """Advisory, so a failed write is ignored: a full disk is reported by the next checkpoint."""
    tmp = run_dir / f".{PROGRESS}.tmp"
    try:
        tmp.write_text(json.dumps(progress))
        os.replace(tmp, run_dir / PROGRESS)
    except OSError:
        tmp.unlink(missing_ok=True)


def read_progress(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's progress.json, or None before training has reported."""
    try:
        return json.loads((Path(run_dir) / PROGRESS).read_text())
    except (OSError, ValueError):
        return None


def duration(seconds: float) -> str:
    """'45s', '4m05s', '1h02m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def describe(progress: dict[str, Any] | None) -> str:
    """'epoch 3/40, step 120/2560, ETA 4m05s' from a progress.json; '-' before training has reported."""
    if not progress:
        return "-"
    where = f"epoch {min(progress['epoch'] + 1, progress['epochs'])}/{progress['epochs']}, " \
            f"step {progress['step']}/{progress['steps']}"
    if progress["phase"] in ("done", "stopped"):
        return f"{progress['phase']} at step {progress['step']}/{progress['steps']}"
    eta = f", ETA {duration(progress['eta_s'])}" if progress.get("eta_s") is not None else ""
    return ("validating, " if progress["phase"] == "validate" else "") + where + eta


class LiveStatus:
    """Draws the tasks of the job being waited for; call `update(entry)` at each poll, `close()` at the end."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.drawn = 0  # lines drawn last time (TTY): moved over and rewritten at the next update
        self.printed: dict[str, str] = {}  # task -> its last printed state (not a TTY)

    def lines(self, entry: dict[str, Any]) -> list[tuple[str, str, str]]:
        """(task name, what it is doing, the part that changes only on a new epoch or phase) per task."""
        elapsed = duration(time.time() - entry.get("started", time.time()))
        rows = []
        for task in entry["tasks"]:
            if task.get("state"):
                rows.append((task["name"], task["state"].lower(), task["state"]))
                continue
            progress = read_progress(task["run_dir"]) if entry["kind"] != "evaluate" else None
            text = describe(progress) if progress else f"running {elapsed}"
            milestone = f"{progress['phase']}:{progress['epoch']}" if progress else "running"
            rows.append((task["name"], text, milestone))
        return rows

    def update(self, entry: dict[str, Any]) -> None:
        rows = self.lines(entry)
        if self.tty:
            width = max(len(name) for name, _, _ in rows)
            out = [f"  {entry['key']}: {name.ljust(width)}  {text}" for name, text, _ in rows]
            up = f"\x1b[{self.drawn}F" if self.drawn else ""
            self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in out))
            self.drawn = len(out)
        else:
            for name, text, milestone in rows:
                if self.printed.get(name) != milestone:
                    self.printed[name] = milestone
                    self.stream.write(f"  {entry['key']}: {name}  {text}\n")
        self.stream.flush()

    def close(self) -> None:
        """The lines drawn stay as the job's final record; the next job draws below them."""
        self.drawn = 0
