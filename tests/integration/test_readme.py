"""The README's CLI reference is the parser's own text, and the README's commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from hpcdistill.cli.main import build_parser, reference_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_cli_reference_matches_help():
    text = README.read_text()
    block = re.search(r"<!-- cli:start -->\n(.*)\n<!-- cli:end -->", text, re.S)
    assert block, "README lacks the <!-- cli:start --> ... <!-- cli:end --> block"
    assert block.group(1) == reference_markdown(), (
        "README CLI reference is stale; regenerate with "
        "python -c 'from hpcdistill.cli.main import reference_markdown; print(reference_markdown())'"
    )


def test_readme_opens_with_the_two_commands_and_names_real_subcommands():
    text = README.read_text()
    head = text[:400]
    assert "make demo" in head and "make test" in head
    parser = build_parser()
    known = set(next(a for a in parser._actions if a.dest == "command").choices)
    used = set(re.findall(r"^hpcdistill (\w+)", text, re.M))
    assert used and used <= known, f"README uses unknown subcommands {used - known}"


def test_architecture_table_names_every_module_once():
    """The README's module table and hpcdistill/*.py are the same set: a new or renamed module must be described."""
    block = re.search(r"<!-- modules:start -->\n(.*)\n<!-- modules:end -->", README.read_text(), re.S)
    assert block, "README lacks the <!-- modules:start --> ... <!-- modules:end --> table"
    named = re.findall(
        r"`(\w+)\.py`", "\n".join(row.split("|")[1] for row in block.group(1).splitlines() if row.startswith("| `"))
    )
    files = {p.stem for p in (README.parent / "hpcdistill").glob("*.py") if p.stem != "__init__"}
    assert sorted(named) == sorted(set(named)), "a module is named twice"
    assert set(named) == files, f"missing from the table: {files - set(named)}; not a module: {set(named) - files}"
