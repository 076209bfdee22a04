"""The record of a demo run: `hpcdistill demo` writes `<out>/demo.json`, its time per phase, the package versions,
the machine and the commit. The README section made from it is docs/demo_section.py's (`make readme-demo`)."""

from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from hpcdistill.common.errors import LaunchError
from hpcdistill.common.files import atomic_write_json, read_json
from hpcdistill.common.provenance import source_commit

RECORD = "demo.json"
PACKAGES = (
    "torch",
    "deepspeed",
    "numpy",
    "pillow",
    "pyvips",
    "pyvips-binary",
    "imagecodecs",
    "webdataset",
    "scipy",
    "matplotlib",
)


# The vector instruction sets torch's CPU kernels dispatch on: two hosts with one CPU model name can differ in them
# (a VM hides AVX-512, a kernel disables AMX), and with them the last bits of a sum.
ISA_FLAGS = ("sse", "ssse", "avx", "fma", "f16c", "amx", "vnni", "bmi")


def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo ({} where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def machine() -> dict[str, Any]:
    """CPU model, its vector instruction sets (and their short hash, `isa`), cores, kernel and OS: what the demo's
    wall-clock times and the last bits of its numbers depend on."""
    cpu = _cpuinfo()
    flags = sorted(f for f in cpu.get("flags", "").split() if f.startswith(ISA_FLAGS))
    return {
        "cpu": cpu.get("model name") or platform.processor() or "unknown CPU",
        "isa": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:8],
        "isa_flags": flags,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    """The installed versions of the packages the demo's numbers depend on (and libvips itself)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    import pyvips

    out["libvips"] = f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"
    return out


def commit() -> str:
    """The checkout's commit, short (common.provenance reads it); 'unknown' outside a checkout."""
    return ((source_commit() or {}).get("commit") or "unknown")[:7]


def write_record(out: Path, summary: dict[str, Any]) -> Path:
    record = {**summary, "commit": commit(), "versions": versions(), "machine": machine()}
    path = out / RECORD
    atomic_write_json(path, record, indent=1)
    return path


def read_record(out: Path) -> dict[str, Any]:
    return read_json(out / RECORD, LaunchError, missing="no demo record; run `make demo` first")
