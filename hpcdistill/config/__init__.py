"""The training run's typed configuration: the schema (the one source of every setting and of the choices models, losses
and the CLI read), YAML and overrides loaded into it, and its range and cross-field checks. Torch-free, so the
launcher validates configs without it."""

from __future__ import annotations

from hpcdistill.config.checks import check_config
from hpcdistill.config.loading import load_config
from hpcdistill.config.schema import Config, resolve_path

__all__ = ["Config", "check_config", "load_config", "resolve_path"]
