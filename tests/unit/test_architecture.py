"""The tree's rules that no linter checks: one error policy (every error type in common/errors.py, no stage raising
the bare base class) and every module a docstring or a page of docs/ names exists, so a move leaves no stale map."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

from hpcdistill.common import errors

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "hpcdistill"
SOURCES = sorted(
    p for p in PACKAGE.rglob("*.py") if "configs" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"
)
STAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
CONFIG_SECTIONS = {"run", "data", "model", "train", "teacher", "log", "evaluate"}  # `train.lr` is a key, not a module


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def test_every_error_type_is_in_common_errors():
    for path in SOURCES:
        importlib.import_module(module_name(path))
    found, todo = [], [errors.HpcdistillError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    outside = [f"{c.__module__}.{c.__qualname__}" for c in found if c.__module__ != errors.__name__]
    assert not outside, f"error types defined outside common/errors.py: {outside}"


def test_no_stage_raises_the_bare_base_class():
    bare = []
    for path in SOURCES:
        if path.parent.name == "common":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                if getattr(node.exc.func, "id", None) == "HpcdistillError":
                    bare.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bare, f"raise the stage's own error type (common/errors.py), not HpcdistillError: {bare}"


def test_the_docs_name_the_error_policy_and_every_error_type():
    text = (REPO / "docs" / "architecture.md").read_text()
    names = [n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.HpcdistillError)]
    missing = [n for n in names if f"`{n}`" not in text]
    assert "## Errors" in text and not missing, f"docs/architecture.md does not name {missing}"


def texts() -> list[tuple[str, str]]:
    """(where, text) of every module docstring, the README and every page of docs/."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    out = [(str(p.relative_to(REPO)), p.read_text()) for p in pages]
    for path in SOURCES + sorted((REPO / "docs").glob("*.py")):
        tree = ast.parse(path.read_text())
        docs = [
            ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
        ]
        out += [(str(path.relative_to(REPO)), d) for d in docs if d]
    return out


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for tgt in targets for n in ast.walk(tgt) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def exists(named: str) -> bool:
    """A path (`train/loop.py`, `bench/bench_predict.py`, `scene.py`) anywhere in the checkout, or a dotted name in
    the package: `stage`, `stage.module`, `stage.name` it exports, or `stage.module.name` that module defines."""
    if named.endswith(".py"):
        leaf = named.rsplit("/", 1)[-1]
        return any(p.as_posix().endswith("/" + named) for p in REPO.rglob(leaf) if ".venv" not in p.parts)
    stage, *rest = named.removeprefix("hpcdistill.").split(".")
    folder = PACKAGE / stage
    if not rest:
        return (folder / "__init__.py").is_file()
    module = folder / f"{rest[0]}.py"
    if module.is_file():
        return len(rest) == 1 or rest[1] in top_level_names(module)
    return rest[0] in importlib.import_module(f"hpcdistill.{stage}").__all__


def test_every_module_a_docstring_or_doc_names_exists():
    """Checked: paths ending in .py, and dotted names of a stage (`scoring.aggregation`); a dotted name whose first
    part is also a config section (`train.lr`, `data.mag`) is checked only when written `hpcdistill.`-first. The
    table of moved modules names old homes on purpose: only its "now" column is checked."""
    stages = "|".join(STAGES)
    stale = []
    for where, text in texts():
        text = re.sub(r"^\| `[^|]*\| (?=.*<!-- moved -->)", "| ", text, flags=re.M)
        paths = re.findall(r"(?<![\w/.-])((?:[a-z_]+/)*[a-z_0-9]+\.py)\b", text)
        dotted = re.findall(rf"(?<![\w./-])((?:hpcdistill\.)?(?:{stages})(?:\.[a-zA-Z_]+)+)(?![\w(/-])", text)
        for name in paths + dotted:
            if re.search(r"\.(csv|ya?ml|json|md|png|npy|pt|tar|txt|svs|tiff?|jpg|log)$", name):
                continue  # a file name (slides.csv, config.yaml), not a module
            if not name.endswith(".py") and not name.startswith("hpcdistill."):
                if name.split(".")[0] in CONFIG_SECTIONS:
                    continue
            if not exists(name):
                stale.append(f"{where}: {name}")
    assert not stale, f"names of modules that do not exist: {sorted(set(stale))}"
