"""Shared by every stage and importing nothing of ours: the error types and one-line messages, magnification names, the
typed config, atomic files and JSON, progress records, ranks, notes to the user, how a signal ends a command and the
one-writer lock."""

from hpcdistill.common import lazy_exports as _lazy

_EXPORTS = {
    "HpcdistillError": "errors",
    "DataError": "errors",
    "LaunchError": "errors",
    "ShardingError": "errors",
    "SlideError": "errors",
    "TrainError": "errors",
    "one_line": "errors",
    "mag_name": "mags",
    "parse_mag": "mags",
    "Config": "config",
    "ConfigError": "errors",
    "load_config": "config",
    "resolve_path": "config",
    "atomic_output": "files",
    "atomic_write_bytes": "files",
    "atomic_write_json": "files",
    "atomic_write_text": "files",
    "read_json": "files",
    "read_progress": "progress",
    "write_progress": "progress",
    "is_rank_zero": "ranks",
    "say": "console",
    "Interrupted": "signals",
    "check_interrupted": "signals",
    "interruptible": "signals",
    "one_writer": "folder_lock",
    "FolderBusy": "folder_lock",
}
__all__, __getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS)
