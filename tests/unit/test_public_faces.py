"""Each subpackage's public face: what a type checker reads (the `TYPE_CHECKING` imports, or the eager imports of the
torch-free packages) is exactly `__all__` and exactly what `__getattr__` returns, no exported name shadows a module,
the design's public names are where the docs say, and importing the launch path or the windowing loads no torch,
DeepSpeed or pyvips."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hpcdistill"
STAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
EAGER = ("common", "config", "cluster")  # torch-free by contract: nothing to defer


def face_imports(stage: str) -> dict[str, str]:
    """Each name the `__init__` imports (at module level or under `if TYPE_CHECKING:`) -> the module it comes from."""
    tree = ast.parse((PACKAGE / stage / "__init__.py").read_text())
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hpcdistill."):
            found.update({alias.asname or alias.name: node.module for alias in node.names})
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_a_face_shows_type_checkers_exactly_what_it_exports(stage):
    package = importlib.import_module(f"hpcdistill.{stage}")
    imports = face_imports(stage)
    assert sorted(package.__all__) == sorted(imports), f"hpcdistill.{stage}: __all__ and the imports differ"
    modules = {p.stem for p in (PACKAGE / stage).glob("*.py")}
    assert not set(package.__all__) & modules, "an exported name is also a module's: one of the two would hide"
    for name, module in imports.items():
        assert getattr(package, name) is getattr(importlib.import_module(module), name), f"hpcdistill.{stage}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = package.not_a_name


@pytest.mark.parametrize("stage", STAGES)
def test_torch_free_faces_import_eagerly_and_the_others_defer(stage):
    source = (PACKAGE / stage / "__init__.py").read_text()
    if stage in EAGER:
        assert "__getattr__" not in source and "TYPE_CHECKING" not in source
    elif face_imports(stage):
        assert "if TYPE_CHECKING:" in source and source.count("def __getattr__") == 1


def test_the_command_entry_is_one_thing():
    import hpcdistill.cli
    from hpcdistill.cli import main

    first = type(main).__name__
    import hpcdistill.cli.main  # noqa: F401

    assert first == type(hpcdistill.cli.main).__name__ == "module" and callable(main.main)


def test_the_designs_public_names():
    from hpcdistill.models import build_model
    from hpcdistill.scoring import bootstrap_ci, classification_metrics
    from hpcdistill.scoring.metrics import bootstrap_ci as metrics_bootstrap_ci
    from hpcdistill.train import pixel_loss, soft_loss
    from hpcdistill.train.losses import soft_loss as losses_soft_loss

    assert bootstrap_ci is metrics_bootstrap_ci and soft_loss is losses_soft_loss
    assert callable(classification_metrics) and callable(build_model) and callable(pixel_loss)


def loaded_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    return set(json.loads(out.stdout))


def test_the_launch_path_imports_no_torch():
    """What `hpcdistill launch` imports to plan and submit: torch and DeepSpeed load only inside the training job.
    The guard pyproject.toml's third import contract names (it allows indirect imports)."""
    modules = loaded_after(
        "import hpcdistill.cli.main, hpcdistill.experiment.launch, hpcdistill.cluster, hpcdistill.config, "
        "hpcdistill.train.task, hpcdistill.evaluate.task"
    )
    assert not {"torch", "deepspeed"} & modules
    assert "hpcdistill.experiment.graph" in modules and "hpcdistill.train.task" in modules


def test_training_reads_windowing_without_pyvips():
    modules = loaded_after("from hpcdistill.slides.windows import Windowing")
    assert "pyvips" not in modules and "openslide" not in modules


def test_the_metrics_load_without_torch():
    modules = loaded_after("from hpcdistill.scoring import classification_metrics, bootstrap_ci")
    assert "torch" not in modules and "hpcdistill.scoring.metrics" in modules
