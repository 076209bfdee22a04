"""The README is short and its commands exist; docs/cli.md is the parser's own text and docs/architecture.md the
tree's own map."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from hpcdistill.cli.main import build_parser, reference_markdown

README = Path(__file__).resolve().parents[2] / "README.md"
CLI_DOC = README.parent / "docs" / "cli.md"
ARCHITECTURE_DOC = README.parent / "docs" / "architecture.md"


def test_cli_reference_matches_help():
    text = CLI_DOC.read_text()
    block = re.search(r"<!-- cli:start -->\n(.*)\n<!-- cli:end -->", text, re.S)
    assert block, "docs/cli.md lacks the <!-- cli:start --> ... <!-- cli:end --> block"
    assert block.group(1) == reference_markdown(), "docs/cli.md is stale: run `make readme`"


def test_readme_is_read_in_ten_minutes_and_every_relative_link_resolves():
    assert len(README.read_text().splitlines()) <= 300
    broken = []
    for page in [README, *sorted((README.parent / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in link and not (page.parent / link).exists():
                broken.append(f"{page.name}: {link}")
    assert not broken, broken


def test_readme_opens_with_the_two_commands_and_names_real_subcommands():
    text = README.read_text()
    head = text[:400]
    assert "make demo" in head and "make test" in head
    parser = build_parser()
    known = set(next(a for a in parser._actions if a.dest == "command").choices)
    used = set(re.findall(r"^hpcdistill (\w+)", text, re.M))
    assert used and used <= known, f"README uses unknown subcommands {used - known}"


def test_architecture_table_names_every_module_once():
    """The README's module table and hpcdistill/<stage>/*.py are the same set: a new or moved module is described."""
    block = re.search(r"<!-- modules:start -->\n(.*)\n<!-- modules:end -->", ARCHITECTURE_DOC.read_text(), re.S)
    assert block, "docs/architecture.md lacks the <!-- modules:start --> ... <!-- modules:end --> table"
    rows = [row.split("|")[1] for row in block.group(1).splitlines() if row.startswith("| `")]
    named = re.findall(r"`(\w+/\w+)\.py`", "\n".join(rows))
    package = README.parent / "hpcdistill"
    files = {p.relative_to(package).with_suffix("").as_posix() for p in package.glob("*/*.py") if p.stem != "__init__"}
    assert sorted(named) == sorted(set(named)), "a module is named twice"
    assert set(named) == files, f"missing from the table: {files - set(named)}; not a module: {set(named) - files}"


def test_architecture_map_is_the_tree_and_its_layers():
    """The README's one-line-per-subpackage map is what docs/architecture_map.py makes from the tree and the
    import-linter layers; every subpackage is in it, and the package has no module at its top level."""
    spec = importlib.util.spec_from_file_location("architecture_map", README.parent / "docs" / "architecture_map.py")
    architecture_map = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(architecture_map)
    block = re.search(r"<!-- tree:start -->\n(.*)\n<!-- tree:end -->", ARCHITECTURE_DOC.read_text(), re.S)
    assert block and block.group(1) == architecture_map.render(), "docs/architecture.md's map is stale: make readme"
    package = README.parent / "hpcdistill"
    stages = {p.parent.name for p in package.glob("*/__init__.py")}
    layered = {name for layer in architecture_map.layers() for name in layer}
    assert stages == layered, f"subpackages outside the import-linter layers: {stages ^ layered}"
    assert sorted(p.name for p in package.glob("*.py")) == ["__init__.py", "__main__.py"]
