"""The exceptions users see, and the one way an error becomes a line: every message names the file or key and
the reason, on a single line."""

from __future__ import annotations

import re


class HpcdistillError(Exception):
    """A user-facing error. `str(err)` is one line: '<file or key>: <reason>'."""


class ConfigError(HpcdistillError):
    """A config or experiment file key that is unknown, mistyped or out of range; the message names the dotted key."""


class ShardingError(HpcdistillError):
    """A bad input or output folder for `hpcdistill shard`; one line naming the file and the reason."""


class DataError(HpcdistillError):
    """Missing shards, a bad manifest, or a sample lacking what the mode needs."""


class TrainError(HpcdistillError):
    """Training cannot start or must stop (bad setup, non-finite loss)."""


class SlideError(HpcdistillError):
    """A slide cannot be opened or read; the message is '<path>: <reason>' on one line."""


class LaunchError(HpcdistillError):
    """A bad experiment file, a failed submission or a failed job."""


class CommandError(HpcdistillError):
    """A bad flag or argument to an `hpcdistill` command that no stage owns (cli)."""


class ModelError(HpcdistillError):
    """A model that cannot be built or run as asked: an unknown architecture, a device this machine lacks (models)."""


class ExportError(ModelError):
    """A file that is not a complete hpcdistill export (or not the model a command expects); one line naming it."""


class NonFiniteOutputError(ModelError):
    """A model produced NaN or infinite outputs: never turned into a class or a score."""


class ScoringError(HpcdistillError):
    """Inputs the metrics cannot score: mismatched label arrays, an unknown aggregation rule (scoring)."""


class EvaluationError(HpcdistillError):
    """An export that cannot be evaluated on a shard split, or a report without its records (evaluate)."""


class PredictionError(HpcdistillError):
    """A slide set, export or option `hpcdistill predict` cannot use (predict)."""


class RegionError(HpcdistillError):
    """A region file (QuPath GeoJSON) that cannot be used: one line naming the file and, where known, the feature."""


class RunFolderError(HpcdistillError):
    """A run folder that cannot be resumed or written as asked (train)."""


class SyntheticError(HpcdistillError):
    """Synthetic slides or datasets that cannot be written as asked (synthetic)."""


class LabelConflict(RegionError):
    """One tissue under regions of two classes: which label it has cannot be told."""


class FolderBusy(HpcdistillError):
    """Another process holds the output folder's writer lock."""


def one_line(err: BaseException | str, limit: int | None = None, *, first_line: bool = False) -> str:
    """An error message (possibly multi-line, e.g. from libvips or a traceback) collapsed to one line of at most
    `limit` characters, or only its first line (`first_line`, for libraries that append pages of detail); an
    exception with an empty message is named by its type."""
    text = str(err).strip()
    if first_line and text:
        text = text.splitlines()[0]
    line = " ".join(text.split()) or (type(err).__name__ if isinstance(err, BaseException) else "")
    return line[:limit] if limit else line


# What submitit appends after a job's traceback: never the telling line.
_TRAILERS = ("You can check", "or at paths", "- /", "File ")


def traceback_line(text: str, *, keep_type: bool = True, limit: int = 300) -> str:
    """The telling line of an error text that carries a traceback (a failed job's, a loader worker's): the raised
    exception, as `Type: message`, or only the message with keep_type=False. Text without a traceback is kept."""
    if "Traceback" not in text:
        return one_line(text, limit) or "no error output"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    line = next((ln for ln in reversed(lines) if ":" in ln and not ln.startswith(_TRAILERS)), lines[-1])
    return (line if keep_type else re.sub(r"^[\w.]+: ", "", line))[:limit]
