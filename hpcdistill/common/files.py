"""Files that are whole or absent, and JSON read with one line of error.

Every write goes to `.<name>.tmp` beside the target, is fsynced, renamed over the target and the folder fsynced: a
reader sees the old file or the whole new one, a crash or a full disk leaves no part behind (the partial file is
removed and the error raised). One policy for shards, journals, manifests, exports, launch records, progress,
predictions and figures."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from hpcdistill.common.errors import HpcdistillError, one_line


def tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename durable; a filesystem that cannot fsync a folder is left as it is."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the temporary path to write (by any library); on success it becomes `path`, on any error it is
    removed and the error raised."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    atomic_write_text(path, json.dumps(obj, **dumps))


def read_json(
    path: str | os.PathLike,
    error: Callable[[str], HpcdistillError] = HpcdistillError,
    *,
    label: str | None = None,
    missing: str = "not found",
) -> Any:
    """The parsed file, or `error` with one line: `label` (default: the path), then the reason. Only a regular file
    is read, at most the `json_bytes` limit of it, nested at most `json_depth` deep (common/limits.py)."""
    from hpcdistill.common.limits import json_depth_ok, read_bounded

    label = str(path) if label is None else label
    if not os.path.lexists(path):
        raise error(f"{label}: {missing}")
    data = read_bounded(path, "json_bytes", error, label)
    json_depth_ok(data, label, error)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{label}: not UTF-8 text ({one_line(err, 120)})") from None
    except json.JSONDecodeError as err:
        raise error(f"{label}: invalid JSON ({err.msg} at line {err.lineno})") from None
