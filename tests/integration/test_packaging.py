"""The package installs with its configs: `configs/...` paths resolve from an installed copy, not only a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from hpcdistill.config import schema as config
from hpcdistill.config.loading import load_config

REPO = Path(__file__).resolve().parents[2]


def test_every_configs_folder_ships_with_the_package():
    """setuptools finds the packages with pyproject.toml's own settings; configs/ arrives as hpcdistill.configs."""
    setuptools = pytest.importorskip("setuptools")
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert find.get("namespaces") is True  # configs' folders hold no __init__.py
    found = set(setuptools.find_namespace_packages(str(REPO), include=find["include"], exclude=find["exclude"]))
    folders = {os.path.relpath(root, REPO / "configs") for root, _, _ in os.walk(REPO / "configs")}
    expected = {"hpcdistill.configs" + ("" if f == "." else "." + f.replace(os.sep, ".")) for f in folders}
    subpackages = {f"hpcdistill.{p.parent.name}" for p in (REPO / "hpcdistill").glob("*/__init__.py")}
    assert expected | subpackages | {"hpcdistill"} <= found, sorted(expected | subpackages - found)
    assert not [name for name in found if "__pycache__" in name]


def test_configs_paths_resolve_from_the_installed_copy(tmp_path, monkeypatch):
    """Outside a checkout (no REPO_ROOT/configs) and away from it (another working directory), the default
    DeepSpeed JSON and a demo config are found in the package's own configs/."""
    installed = tmp_path / "site" / "hpcdistill" / "configs"
    shutil.copytree(REPO / "configs", installed)
    monkeypatch.setattr(config, "REPO_ROOT", tmp_path / "no-checkout")
    monkeypatch.setattr(config, "PACKAGE_CONFIGS", installed)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/demo/teacher.yaml", [f"data.shards={tmp_path}"])
    assert config.resolve_path(cfg.deepspeed) == installed / "deepspeed" / "zero0.json"
    assert cfg.train.mode == "teacher" and cfg.model.arch == "resnet10"  # from common.yaml, its base:
    assert config.resolve_path("configs/none.json") == tmp_path / "no-checkout" / "configs" / "none.json"


@pytest.mark.slow
def test_the_wheel_holds_the_configs(tmp_path):
    """A real (non-editable) build: the wheel carries hpcdistill/configs/** next to the code."""
    source = tmp_path / "src"  # setuptools builds in the source tree: build from a copy, leave the checkout alone
    for name in ("hpcdistill", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("hpcdistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        f"hpcdistill/configs/{p.relative_to(REPO / 'configs').as_posix()}"
        for p in (REPO / "configs").rglob("*")
        if p.suffix in (".yaml", ".json")
    }
    assert shipped and shipped <= names and "hpcdistill/train/loop.py" in names
