"""`<run>/metrics.jsonl`: every scalar the run logs to TensorBoard, also as one JSON line per log step and one per
validation, for a scheduler's log collector, `jq` or pandas (`pd.read_json(path, lines=True)`). The line holds the
step, the epoch, the wall-clock time and the scalars under their TensorBoard tags.

A resumed run first drops the lines past the step it resumes from (logged after the checkpoint it restarts at, and
logged again by the resumed run), so each step appears once, as in a run that was never stopped."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from hpcdistill.common.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
VALIDATION_TAGS = ("val/", "val_class/")  # a validation's own line; every other scalar is a training log step


def _kind(tag: str) -> str:
    return "validation" if tag.startswith(VALIDATION_TAGS) else "train"


def trim_after(path: Path, step: int) -> None:
    """Keep the lines of `path` up to `step` (a resume's step); a torn last line (a kill mid-write) goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class MetricsLog:
    """TensorBoard's writer (or its stand-in), with every `add_scalar` also gathered into metrics.jsonl lines: the
    scalars of one step and one kind (train or validation) make one line, written when the next begins or at
    `flush`. Everything else goes to the wrapped writer unchanged."""

    def __init__(self, writer: Any, run_dir: Path, resume_step: int, epoch_of: Any) -> None:
        self.writer, self.path, self.epoch_of = writer, Path(run_dir) / METRICS_FILE, epoch_of
        trim_after(self.path, resume_step)
        self.file = open(self.path, "a")
        self.line: dict[str, Any] | None = None

    def add_scalar(self, tag: str, value: float, step: int, *args: Any, **kwargs: Any) -> None:
        self.writer.add_scalar(tag, value, step, *args, **kwargs)
        kind = _kind(tag)
        if self.line is not None and (self.line["kind"], self.line["step"]) != (kind, step):
            self._write_line()
        if self.line is None:
            self.line = {"kind": kind, "step": int(step), "epoch": self.epoch_of(), "time": round(time.time(), 3)}
        value = float(value)
        self.line[tag] = value if math.isfinite(value) else str(value)  # JSON has no NaN: "nan" is said, not lost

    def _write_line(self) -> None:
        if self.line is not None:
            self.file.write(json.dumps(self.line) + "\n")
            self.line = None

    def flush(self) -> None:
        self._write_line()
        self.file.flush()
        self.writer.flush()

    def close(self) -> None:
        self.flush()
        self.file.close()
        self.writer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)
