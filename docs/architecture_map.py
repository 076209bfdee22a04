"""The map of the package tree in docs/architecture.md, made from the tree itself: one line per subpackage, in the
order of the import-linter layers in pyproject.toml (top first), with its job (its `__init__` docstring) and what it
may import. `make readme` writes it; tests/integration/test_readme.py checks it is there."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def layers() -> list[list[str]]:
    """The layers contract, top first, each a list of subpackage names (independent siblings share a layer)."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c["type"] == "layers"]
    return [[name.strip().removeprefix("hpcdistill.") for name in layer.split("|")] for layer in contract["layers"]]


def job(package: str) -> str:
    docstring = ast.get_docstring(ast.parse((REPO / "hpcdistill" / package / "__init__.py").read_text())) or ""
    return " ".join(docstring.split()).rstrip(".")


def render() -> str:
    order = layers()
    lines = []
    for depth, layer in enumerate(order):
        below = [name for lower in order[depth + 1 :] for name in lower]
        for package in layer:
            may = ", ".join(f"`{name}`" for name in below) or "nothing of ours"
            lines.append(f"- `{package}/`: {job(package)}. May import: {may}.")
    return "\n".join(lines)


def write_readme() -> None:
    readme = REPO / "docs" / "architecture.md"
    text = re.sub(
        r"<!-- tree:start -->\n.*?<!-- tree:end -->",
        lambda _: f"<!-- tree:start -->\n{render()}\n<!-- tree:end -->",
        readme.read_text(),
        flags=re.S,
    )
    readme.write_text(text)


if __name__ == "__main__":
    write_readme() if sys.argv[1:] == ["--write"] else print(render())
