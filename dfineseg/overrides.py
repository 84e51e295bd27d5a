"""`key.sub=value` overrides and YAML merging, without pydantic or torch.

Kept separate from `config.py` so the torch-free deployment CLI (`dfineseg infer`) can parse its
arguments on an edge install that has neither pydantic nor torch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from dfineseg.infer.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-facing configuration problem; the message names the file or key and the fix."""


def parse_value(text: str) -> Any:
    """YAML scalar/list parsing, so `imgsz=[480,640]`, `amp=false`, `lr=1e-4` get their natural types."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str], aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """Turn `["a.b=1", "epochs=3"]` into a nested dict; `aliases` maps short keys (`epochs`) to paths."""
    aliases = aliases or {}
    nested: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"argument '{arg}' is not of the form key=value (for example epochs=10)")
        key, _, raw = arg.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise ConfigError(f"argument '{arg}' has an empty key")
        key = aliases.get(key, key)
        set_path(nested, key, parse_value(raw))
    return nested


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge; `update` wins. Neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML mapping; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, found {type(data).__name__}")
    return data


def load_yaml_with_bases(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file may start with `base: other.yaml` or `base: [a.yaml, b.yaml]` (paths relative to it)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' includes form a cycle: {' -> '.join(map(str, _seen + (path,)))}")
    data = load_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        return data
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        base_path = Path(base)
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        merged = deep_merge(merged, load_yaml_with_bases(base_path, _seen + (path,)))
    return deep_merge(merged, data)

