"""Each subpackage's public face: every name in `__all__` resolves, the design's public names are where the README
says, and importing the launch path or the windowing loads no torch, DeepSpeed or pyvips."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hpcdistill"
STAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))


@pytest.mark.parametrize("stage", STAGES)
def test_every_exported_name_resolves(stage):
    package = importlib.import_module(f"hpcdistill.{stage}")
    assert package.__all__ == sorted(package.__all__) and package.__all__
    for name in package.__all__:
        assert getattr(package, name) is not None, f"hpcdistill.{stage}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = package.not_a_name


def test_the_designs_public_names():
    from hpcdistill.evaluate import bootstrap_ci, classification_metrics
    from hpcdistill.models import build_model
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
    """What `hpcdistill launch` imports to plan and submit: torch and DeepSpeed load only inside the training job."""
    modules = loaded_after(
        "import hpcdistill.cli.main, hpcdistill.experiment.launch, hpcdistill.cluster, hpcdistill.train.task"
    )
    assert not {"torch", "deepspeed"} & modules
    assert "hpcdistill.experiment.graph" in modules and "hpcdistill.train.task" in modules


def test_training_reads_windowing_without_pyvips():
    modules = loaded_after("from hpcdistill.slides.windows import Windowing")
    assert "pyvips" not in modules and "openslide" not in modules
