"""Typed dataclass configs: command-line ``field=value`` overrides, name suggestions, and dict round trips."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C")


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """' Did you mean ...?' for the closest names, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _parse_value(text: str, annotation: Any, where: str) -> Any:
    """Parse ``text`` as a value of the (possibly optional) type ``annotation``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse_value(text, arg, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where} expects true/false, got {text!r}")
    if annotation in (int, float, str):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"{where} expects {annotation.__name__}, got {text!r}") from None
    if origin in (tuple, list):
        try:
            value = json.loads(text if text.startswith("[") else f"[{text}]")
        except json.JSONDecodeError:
            raise ValueError(f"{where} expects a list like [64,128] or 64,128, got {text!r}") from None
        return origin(value)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: C, overrides: typing.Sequence[str]) -> C:
    """A copy of dataclass ``config`` with ``field=value`` strings applied (types follow the annotations)."""
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like field=value")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in names:
            raise ValueError(f"{type(config).__name__} has no field {key!r}.{suggest(key, names)}")
        changes[key] = _parse_value(text, hints[key], f"{type(config).__name__}.{key}")
    return dataclasses.replace(config, **changes)


def config_to_dict(config: Any) -> dict:
    """Plain, JSON-serialisable dict of a dataclass config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type[C], data: dict) -> C:
    """Rebuild a dataclass config, restoring tuples and rejecting unknown fields."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)} (config from another diffrl version?)")
    values = {}
    for key, value in data.items():
        if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        values[key] = value
    return cls(**values)
