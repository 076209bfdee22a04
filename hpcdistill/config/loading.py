"""A training config loaded: the defaults, then the YAML file (safe_load, following `base:`), then `a.b=value`
overrides, built into the typed tree (schema.py) and checked (checks.py), with `run.name`'s template filled in.
Precedence: command-line overrides > the YAML file (and the files it names under `base:`) > the defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcdistill.common.console import say
from hpcdistill.common.errors import ConfigError
from hpcdistill.common.typed_tree import build_dataclass, parse_override, read_yaml, set_dotted
from hpcdistill.config.checks import UNUSED_BY_MODE, check_config, unused_in_mode
from hpcdistill.config.schema import Config, resolve_path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (following `base:`), then `a.b=value` overrides; all validated. An override of a
    key the chosen mode never reads is said in one line (it would be stored in config.yaml, and do nothing)."""
    raw: dict[str, Any] = read_yaml(resolve_path(str(path)), ()) if path is not None else {}
    given = []
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
        given.append(key)
    cfg = from_dict(raw)
    for key in given:
        if unused_in_mode(key, cfg.train.mode):
            say(f"{key}: not used in {cfg.train.mode} mode ({UNUSED_BY_MODE[cfg.train.mode][1]}); it changes nothing")
    return cfg


def from_dict(raw: dict[str, Any]) -> Config:
    cfg = build_dataclass(Config, raw, "")
    check_config(cfg)
    cfg.run.name = _run_name(cfg)
    return cfg


def _run_name(cfg: Config) -> str:
    """run.name with its template filled in ({mode}, {mag}, {seed}); a stored, filled-in name stays as it is."""
    template = cfg.run.name
    try:
        name = template.format(mode=cfg.train.mode, mag=f"{cfg.model_mag:g}", seed=cfg.run.seed)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"run.name: {template!r}: a template may name {{mode}}, {{mag}} and {{seed}} ({err})"
        ) from None
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"run.name: {name!r}: must be a folder name (no '/')")
    return name
