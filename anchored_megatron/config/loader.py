"""YAML + dotted ``key=value`` overrides -> config dataclasses, with every value type-checked.

A value's type comes from the dataclass annotation. Numbers written the way people write
them are accepted (``lr: 1e-5`` and ``optim.lr=3e-3`` are strings to YAML 1.1, they are floats
here); anything else of the wrong type is refused as ``<key>: expected <type>, got <value>``.
``build`` also records which keys the user set (``RunConfig.explicit_keys``), so that a
preset or a checkpoint fills only what was left unset and a value set to its default is
still a value the user set.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from typing import Any

from anchored_megatron.config.errors import ConfigError

_MISSING = object()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(tp) -> str:
    """A reader's name for an annotation: 'an integer', 'a number or null', 'a list of strings'."""
    args = typing.get_args(tp)
    if _is_optional(tp):
        inner = [a for a in args if a is not type(None)][0]
        return f"{_describe(inner)} or null"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s" if args else "a list"
    if dataclasses.is_dataclass(tp):
        return "a section (a mapping of options)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(tp, str(tp))


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _coerce(value: Any, tp, key: str):
    """``value`` as the annotation ``tp`` asks, or ConfigError naming ``key``."""
    if _is_optional(tp):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) != 1:
            return value
        try:
            return _coerce(value, inner[0], key)
        except ConfigError as exc:
            if str(exc).startswith(f"{key}: expected "):  # say that null is allowed too
                raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}") from None
            raise
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise wrong from None
            if math.isfinite(number):
                return number
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise wrong
    if origin is list:
        item = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        if isinstance(value, str) and item is str:
            return [value]  # `data.paths=train.jsonl` on a command line means a list of one
        if not isinstance(value, (list, tuple)):
            raise wrong
        return [_coerce(v, item, f"{key}[{i}]") if item is not Any else v for i, v in enumerate(value)]
    return value


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls) -> dict[str, dataclasses.Field]:
    """The options a user may set (internal fields such as the explicit-key record excluded)."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _build(cls, data: Any, prefix: str, explicit: set[str]):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix or "config"
        raise ConfigError(f"{where}: expected a section (a mapping of options), got {data!r}")
    known = _fields(cls)
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = _join(prefix, str(name))
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean {_join(prefix, close[0])}?" if close else f" (known: {', '.join(sorted(known))})"
            raise ConfigError(f"{key}: unknown option{hint}")
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key, explicit)
        else:
            kwargs[name] = _coerce(value, tp, key)
            explicit.add(key)
    return cls(**kwargs)


def build(cls, data: dict | None, prefix: str = ""):
    """A config dataclass from a nested dict: unknown keys refused, types checked.

    For a ``RunConfig`` the keys the user set are recorded in ``explicit_keys`` and the model
    preset is applied to the model fields left unset.
    """
    explicit: set[str] = set()
    config = _build(cls, data, prefix, explicit)
    if "explicit_keys" in {f.name for f in dataclasses.fields(cls)}:
        from anchored_megatron.config.presets import apply_preset

        config.explicit_keys = frozenset(explicit)
        model_explicit = {k.split(".", 1)[1] for k in explicit if k.startswith("model.")}
        config.model = apply_preset(config.model, model_explicit)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as a YAML scalar or flow collection)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected a dotted key such as optim.lr")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise ConfigError(f"{key}: the value {raw!r} is not valid YAML ({problem})") from None
    return key.split("."), value


def merge_overrides(data: dict | None, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a nested dict (returns a new dict)."""
    data = copy.deepcopy(data or {})
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part, _MISSING)
            if child is _MISSING or child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path[: depth + 1])}: is an option, not a section (in override {text!r})")
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_run_config(path: str | None, overrides: list[str] | None = None):
    """YAML file (optional) + dotted ``key=value`` overrides -> RunConfig (preset applied)."""
    from anchored_megatron.config.run import RunConfig

    data = load_yaml(path) if path else {}
    data = merge_overrides(data, overrides or [])
    return build(RunConfig, data)


def to_dict(config) -> dict:
    """The options of a config dataclass as plain data (internal fields left out)."""
    out = {}
    for name, f in _fields(type(config)).items():
        value = getattr(config, name)
        out[name] = to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out
