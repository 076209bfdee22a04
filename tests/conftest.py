"""Shared test set-up: CPU DeepSpeed, one thread per process (2-core CI machines)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles a small shm op on first init; cache it across tests and runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
