"""Reading, merging and writing config trees: the machinery below config.py's dataclasses.

`merge` applies a nested dict (a preset, a --config file, a --set item, a checkpoint's stored config)
to a dataclass, strict on keys (an unknown one names the nearest valid key) and on types (YAML values
gently converted: 1e-4 is a float, on/off a Literal). `parse_set` and `load_yaml` turn --set items and
YAML files into such dicts; `to_dict`/`to_yaml`/`save` write a tree back; `field_docs` and `changes`
list its leaves for `d2v config show` and the config summary. Nothing here knows the d2v tree itself:
config.py imports this module (and re-exports its names), never the reverse.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from d2vcli.errors import UserError
from d2vcli.fileio import atomic_write_text


class ConfigError(UserError):
    """A config problem the user can fix; the message says how."""


# --------------------------------------------------------------------------- merging and type checking


def _suggest(key: str, valid: list[str], where: str = "") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    prefix = f"{where}." if where else ""
    return f" Did you mean '{prefix}{close[0]}'?" if close else f" Valid keys: {', '.join(valid)}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads 1e-4, 5E-4 and 1_000.5 as strings (it wants a dot and a
            # signed exponent: 1.0e-4). Every spelling Python's float() accepts is a float here, plus
            # YAML's own .inf / -.inf / .nan.
            return _parse_float(value, where)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


_YAML_SPECIAL_FLOATS = {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}


def _parse_float(text: str, where: str) -> float:
    t = text.strip()
    t = _YAML_SPECIAL_FLOATS.get(t.lower(), t)
    try:
        return float(t)
    except ValueError:
        raise ConfigError(f"{where}: expected a number (e.g. 0.001, 1e-4, 5E-4), got {text!r}") from None


def merge(obj: Any, delta: dict, where: str = "") -> Any:
    """Return a copy of dataclass `obj` with `delta` (nested dict) applied; strict on keys and types."""
    if not isinstance(delta, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {delta!r}")
    hints = typing.get_type_hints(type(obj))
    names = [fl.name for fl in dataclasses.fields(obj)]
    changes = {}
    for key, value in delta.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'.{_suggest(str(key), names, where)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, path)
        else:
            changes[key] = _coerce(value, hints[key], path)
    return dataclasses.replace(obj, **changes)


def parse_set(item: str) -> dict:
    """'a.b=c' -> {'a': {'b': c}} with c parsed as YAML (so numbers, lists, null work)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. --set optim.lr=1e-4), got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key.strip()}: the value {raw!r} is not valid YAML ({e.problem or e}); "
                          f"quote strings and write lists as [a, b]") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{path} is a directory, not a YAML config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8 at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


# --------------------------------------------------------------------------- (de)serialization


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML, JSON and weights_only checkpoints."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {fl.name: conv(getattr(v, fl.name)) for fl in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line: `conv_layers: [[512, 10, 5], ...]`."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def to_yaml(cfg: Any) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def save(cfg: Any, path: Path) -> None:
    atomic_write_text(Path(path), to_yaml(cfg))


def field_docs(cfg: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, value, doc) for every leaf field, in declaration order."""
    rows = []
    for fl in dataclasses.fields(cfg):
        v = getattr(cfg, fl.name)
        key = f"{prefix}{fl.name}"
        if dataclasses.is_dataclass(v):
            rows.extend(field_docs(v, key + "."))
        else:
            rows.append((key, v, fl.metadata.get("doc", "")))
    return rows


def changes(cfg: Any, base: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in `base`, value in `cfg`) for every leaf field that differs, in declaration order."""
    before = {k: v for k, v, _ in field_docs(base)}
    return [(k, before[k], v) for k, v, _ in field_docs(cfg) if before[k] != v]
