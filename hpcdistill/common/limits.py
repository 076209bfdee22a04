"""The bounds on untrusted input, in one place, and the readers that apply them before any expensive call.

A file a user names (a region file, a labels CSV, a config, a record, a slide, a checkpoint) is read only if it is a
regular file (never a device, FIFO or socket, which `stat` reports as 0 bytes and which never end), and never past
its byte limit whatever `stat` says. Every limit can be raised for one run with the environment variable
`HPCDISTILL_MAX_<NAME>` (e.g. `HPCDISTILL_MAX_REGION_VERTICES=5000000`); docs/reliability.md lists them."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

from hpcdistill.common.errors import HpcdistillError

# name: (default, what it bounds). Raised per run with HPCDISTILL_MAX_<NAME>.
LIMITS: dict[str, tuple[float, str]] = {
    "region_bytes": (64 * 2**20, "bytes of one region (GeoJSON) file"),
    "region_vertices": (1_000_000, "vertices in one region file (a hand-drawn annotation has thousands)"),
    "region_raster_work": (200_000_000, "steps to draw one slide's regions on its thumbnail (rows crossed + pixels)"),
    "json_depth": (64, "nesting depth of a JSON file (GeoJSON needs 7)"),
    "json_bytes": (256 * 2**20, "bytes of a JSON record the toolkit reads (manifest, export record, journal)"),
    "csv_bytes": (64 * 2**20, "bytes of a labels CSV"),
    "config_bytes": (4 * 2**20, "bytes of a YAML config or experiment file"),
    "level0_pixels": (2**36, "pixels a slide's level 0 may declare (a 262,144 px square)"),
    "thumbnail_source_pixels": (2**32, "pixels decoded to find tissue when a slide has no smaller level"),
    "bootstrap_iterations": (1_000_000, "bootstrap resamples of one evaluation"),
}
# Physical ranges of a slide's metadata: an objective power or a pixel size outside them is a corrupt header.
OBJECTIVE_RANGE = (0.1, 400.0)
MPP_RANGE = (0.01, 100.0)


def limit(name: str) -> int:
    """The limit `name`, from HPCDISTILL_MAX_<NAME> when set (a positive integer), else its default."""
    default, _ = LIMITS[name]
    text = os.environ.get(f"HPCDISTILL_MAX_{name.upper()}")
    if text is None:
        return int(default)
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value <= 0:
        raise HpcdistillError(f"HPCDISTILL_MAX_{name.upper()}={text!r}: expected a positive integer")
    return value


def raise_hint(name: str) -> str:
    return f"HPCDISTILL_MAX_{name.upper()} raises the limit of {limit(name):,}"


_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def file_kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def regular_file(path: str | os.PathLike, error: Callable[[str], HpcdistillError]) -> Path:
    """`path` if it (or what its symlink points at) is a regular file; else `error` in one line saying what it is."""
    label = str(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{label}: no such file") from None
    except OSError as err:
        raise error(f"{label}: unreadable ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{label}: is {file_kind(mode)}, not a regular file")
    return Path(path)


def read_bounded(
    path: str | os.PathLike, name: str, error: Callable[[str], HpcdistillError], label: str | None = None
) -> bytes:
    """The bytes of a regular file, refused in one line if it holds more than the limit `name` (read, not stat'ed:
    at most limit + 1 bytes are ever read). Opened non-blocking, so a FIFO is refused instead of waited on. Messages
    start with `label` (default: the path)."""
    label = str(path) if label is None else label
    cap = limit(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{label}: no such file") from None
    except OSError as err:
        raise error(f"{label}: unreadable ({err.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{label}: is {file_kind(mode)}, not a regular file")
        chunks, size = [], 0
        while size <= cap:
            chunk = os.read(fd, min(2**20, cap + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise error(f"{label}: unreadable ({err.strerror})") from None
    finally:
        os.close(fd)
    if size > cap:
        raise error(f"{label}: larger than {cap:,} bytes ({LIMITS[name][1]}; {raise_hint(name)})")
    return b"".join(chunks)


def json_depth_ok(data: bytes, label: str, error: Callable[[str], HpcdistillError]) -> None:
    """Refuse JSON nested deeper than the `json_depth` limit, before parsing it (the parser recurses: 200,000
    brackets are a RecursionError). Linear in the bytes, in blocks of bounded memory; brackets inside strings do not
    count. Escapes are blanked first, left to right as JSON reads them (an escaped backslash, then an escaped quote),
    so every quote left is a string's edge."""
    import numpy as np

    clean = data.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    depth = deepest = parity = 0
    for start in range(0, len(clean), _BLOCK):
        part = np.frombuffer(clean, dtype=np.uint8, count=min(_BLOCK, len(clean) - start), offset=start)
        quotes = part == ord('"')
        inside = (np.cumsum(quotes, dtype=np.int32) + parity) % 2 == 1
        steps = ((part == _OPEN[0]) | (part == _OPEN[1])).view(np.int8) - ((part == _CLOSE[0]) | (part == _CLOSE[1]))
        steps[inside] = 0
        running = np.cumsum(steps, dtype=np.int64) + depth
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
        parity = (parity + int(quotes.sum())) % 2
    if deepest > limit("json_depth"):
        raise error(f"{label}: JSON nested {deepest} levels deep ({raise_hint('json_depth')})")


_BLOCK = 4 * 2**20  # bytes scanned at once: about 60 MB of temporaries
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))


def available_cores() -> int:
    """The cores this process may run on (the SLURM allocation or cgroup's, not the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
