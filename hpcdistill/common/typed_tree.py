"""A typed tree from YAML: files read with `safe_load` (following `base:`), merged, `a.b=value` overrides, and
dataclasses built from the result with every key and type checked, so a typo or a wrong type is one line naming
the dotted key. The training config and the experiment file are both built here."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml

from hpcdistill.common.errors import ConfigError, one_line
from hpcdistill.common.limits import read_bounded


def read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: circular base: chain")
    text = read_bounded(path, "config_bytes", ConfigError)
    try:
        data = yaml.safe_load(text.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({one_line(err)})") from None
    if data is None or data == {}:  # a run on every default was never what the file's author meant
        raise ConfigError(f"{path}: holds no settings; write the keys you mean (or `base: <file>` to start from one)")
    check_size(data, path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = read_yaml(path.parent / str(base), chain + (path,))
    return merge_dicts(parent, data)


MAX_VALUES = 100_000  # a config or experiment file holds hundreds; anchors and aliases can multiply that without end


def check_size(data: Any, path: Path) -> None:
    """Refuse a file that expands past MAX_VALUES values (aliases to aliases, a "billion laughs"): the walk stops at
    the bound, so the check itself is bounded."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(f"{path}: more than {MAX_VALUES:,} values once its anchors and aliases are expanded")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def short(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: an error line never prints an unbounded value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def merge_dicts(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=0.001")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # let type validation report it against the key
    return key.strip(), value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
        node = child
    node[parts[-1]] = value


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or '<top>'}: expected a mapping, got {short(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            dotted = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{dotted}: unknown key{hint}")
    values = {}
    for name in names:
        if name in raw:
            values[name] = coerce(hints[name], raw[name], f"{prefix}{name}")
    return cls(**values)


def coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}; got {short(value)}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        one = item_tp is str or typing.get_origin(item_tp) is Literal
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and one:
            value = [value] if value != "" else []  # `train=aux1` on the CLI means a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {short(value)}")
        return [coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _in_range(value, key)
        raise ConfigError(f"{key}: expected int, got {short(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _in_range(float(value), key)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return _in_range(float(value), key)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {short(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. run.name=42
        raise ConfigError(f"{key}: expected a string, got {short(value)}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # pragma: no cover - a bug in this file


MAX_MAGNITUDE = 1e30  # finite and within this: larger overflows float32 math (tests inject divergence at 1e30)


def _in_range(value: Any, key: str) -> Any:
    """A finite number within +-MAX_MAGNITUDE (each key's own range is checked where it is used)."""
    if value != value or abs(value) > MAX_MAGNITUDE:  # NaN, inf, 1e308
        raise ConfigError(f"{key}: {short(value)} is not a usable number (finite, at most {MAX_MAGNITUDE:g} in size)")
    return value


def walk_dotted(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every node of a nested mapping as (dotted key, value), branches before their leaves:
    {"train": {"lr": 1}} -> ("train", {...}), ("train.lr", 1)."""
    for key, value in tree.items():
        yield prefix + key, value
        if isinstance(value, dict):
            yield from walk_dotted(value, f"{prefix}{key}.")


def dotted_leaves(tree: dict[str, Any]) -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    return {key: value for key, value in walk_dotted(tree) if not isinstance(value, dict)}
