"""Shared by every stage and importing nothing of ours: the error types (every stage's, one policy: errors.py) and
one-line messages, magnification names, the limits on untrusted input, atomic files and JSON, progress records, ranks,
notes to the user, how a signal ends a command and the one-writer lock. Torch-free, so imported eagerly."""

from __future__ import annotations

from hpcdistill.common.console import say
from hpcdistill.common.errors import (
    CommandError,
    ConfigError,
    DataError,
    EvaluationError,
    ExportError,
    FolderBusy,
    HpcdistillError,
    LabelConflict,
    LaunchError,
    ModelError,
    NonFiniteOutputError,
    PredictionError,
    RegionError,
    RunFolderError,
    ScoringError,
    ShardingError,
    SlideError,
    SyntheticError,
    TrainError,
    one_line,
)
from hpcdistill.common.files import atomic_output, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from hpcdistill.common.folder_lock import one_writer
from hpcdistill.common.limits import limit
from hpcdistill.common.mags import mag_name, parse_mag
from hpcdistill.common.progress import read_progress, write_progress
from hpcdistill.common.ranks import is_rank_zero
from hpcdistill.common.signals import Interrupted, check_interrupted, interruptible

__all__ = [
    "CommandError",
    "ConfigError",
    "DataError",
    "EvaluationError",
    "ExportError",
    "FolderBusy",
    "HpcdistillError",
    "Interrupted",
    "LabelConflict",
    "LaunchError",
    "ModelError",
    "NonFiniteOutputError",
    "PredictionError",
    "RegionError",
    "RunFolderError",
    "ScoringError",
    "ShardingError",
    "SlideError",
    "SyntheticError",
    "TrainError",
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_interrupted",
    "interruptible",
    "is_rank_zero",
    "limit",
    "mag_name",
    "one_line",
    "one_writer",
    "parse_mag",
    "read_json",
    "read_progress",
    "say",
    "write_progress",
]
