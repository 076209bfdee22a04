"""Training progress: the run folder's progress.json (written by the engine through `RunFolder`, read here without
torch, so the launcher can show it), and what a launch's jobs are doing for a person at a terminal: one line per
task with its epoch, step and ETA. On a TTY the lines are redrawn in place; otherwise a line is printed whenever a
task reaches a new epoch or phase, so logs stay readable."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from hpcdistill.common.files import atomic_write_json

# {"mode", "phase", "epoch", "epochs", "step", "steps", "eta_s", "updated"}; array tasks give "unit" (e.g. "slide")
# instead of epochs, and count units in step/steps
PROGRESS = "progress.json"


def write_progress(run_dir: Path, progress: dict[str, Any]) -> None:
    """Advisory, so a failed write is ignored: a full disk is reported by the next checkpoint."""
    try:
        atomic_write_json(run_dir / PROGRESS, progress)
    except OSError:
        pass


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
    if "unit" in progress:  # sharding and prediction tasks count slides, not epochs and steps
        if progress["phase"] == "done":
            return f"done: {progress['step']}/{progress['steps']} {progress['unit']}s"
        return f"{progress['unit']} {progress['step']}/{progress['steps']}"
    where = (
        f"epoch {min(progress['epoch'] + 1, progress['epochs'])}/{progress['epochs']}, "
        f"step {progress['step']}/{progress['steps']}"
    )
    if progress["phase"] in ("done", "stopped", "interrupted"):
        return f"{progress['phase']} at step {progress['step']}/{progress['steps']}"
    eta = f", ETA {duration(progress['eta_s'])}" if progress.get("eta_s") is not None else ""
    return ("validating, " if progress["phase"] == "validate" else "") + where + eta


class LiveStatus:
    """Draws the started tasks of the given jobs; call `update(entries)` at each poll, `close()` at the end."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.drawn = 0  # lines drawn last time (TTY): moved over and rewritten at the next update
        self.printed: dict[str, str] = {}  # task -> its last printed milestone (not a TTY)

    @staticmethod
    def rows(entry: dict[str, Any]) -> list[tuple[str, str, str]]:
        """(job: task, what it is doing, a milestone that changes every 10% of its steps or on finishing) per
        started task of one job's launch record."""
        elapsed = duration(time.time() - entry.get("started", time.time()))
        rows = []
        for task in entry["tasks"]:
            label = f"{entry['key']}: {task['name']}"
            if task.get("state") == "PENDING":
                continue
            if task.get("state"):
                rows.append((label, task["state"].lower(), task["state"]))
                continue
            progress = read_progress(task["run_dir"]) if entry["kind"] != "evaluate" else None
            if not progress:
                rows.append((label, f"running {elapsed}", "running"))
                continue
            tenth = (
                "end"
                if progress["phase"] in ("done", "stopped")
                else str(10 * progress["step"] // max(1, progress["steps"]))
            )
            rows.append((label, describe(progress), tenth))
        return rows

    def update(self, entries: list[dict[str, Any]]) -> None:
        rows = [row for entry in entries for row in self.rows(entry)]
        if not rows:
            return
        if self.tty:
            width = max(len(label) for label, _, _ in rows)
            up = f"\x1b[{self.drawn}F" if self.drawn else ""
            self.stream.write(up + "".join(f"\x1b[2K  {label.ljust(width)}  {text}\n" for label, text, _ in rows))
            self.drawn = len(rows)
        else:
            for label, text, milestone in rows:
                if self.printed.get(label) != milestone:
                    self.printed[label] = milestone
                    self.stream.write(f"  {label}  {text}\n")
        self.stream.flush()

    def close(self) -> None:
        """The lines drawn stay as the final record; whatever is drawn next goes below them."""
        self.drawn = 0
