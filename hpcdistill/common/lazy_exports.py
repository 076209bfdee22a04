"""A subpackage's public face without its weight: `__init__` names what it exports and from which module, and a
name's module is imported on first use (PEP 562), so importing a subpackage never pulls in torch, pyvips or
DeepSpeed that the caller does not use (the launcher must not import torch; training reads windows without pyvips)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """(`__all__`, `__getattr__`, `__dir__`) for `package`, whose `exports` maps each public name to its module."""

    def getattr_(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def dir_() -> list[str]:
        return sorted(exports)

    return sorted(exports), getattr_, dir_
