"""Typed dataclass configs: command-line ``field=value`` overrides, name suggestions, and dict round trips.

Values are checked against the field annotations both ways in, and numbers must be finite: ``lr=inf`` or a
``NaN`` in a config file is refused with the field's name.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
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
            value = annotation(text)
        except ValueError:
            raise ValueError(f"{where} expects {annotation.__name__}, got {text!r}") from None
        return check_value(value, annotation, where)
    if origin in (tuple, list):
        try:
            value = json.loads(text if text.startswith("[") else f"[{text}]")
        except json.JSONDecodeError:
            raise ValueError(f"{where} expects a list like [64,128] or 64,128, got {text!r}") from None
        return check_value(origin(value), annotation, where)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _is(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (as JSON or the command line gives it) has the annotated type; unknown kinds pass."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return isinstance(value, list | tuple) and all(_is(v, args[0]) for v in value) if args else \
            isinstance(value, list | tuple)
    return True


def check_value(value: Any, annotation: Any, where: str) -> Any:
    """``value`` if it has the annotated type and every number in it is finite, else a ValueError."""
    numbers = value if isinstance(value, list | tuple) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        raise ValueError(f"{where} must be finite, got {value!r}")
    if not _is(value, annotation):
        name = getattr(annotation, "__name__", None) or str(annotation)
        raise ValueError(f"{where} expects {name}, got {value!r}")
    return value


def parse_overrides(cls: type, overrides: typing.Sequence[str]) -> dict[str, Any]:
    """``field=value`` strings as values of the fields of dataclass ``cls`` (types follow the annotations)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like field=value")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in names:
            raise ValueError(f"{cls.__name__} has no field {key!r}.{suggest(key, names)}")
        changes[key] = _parse_value(text, hints[key], f"{cls.__name__}.{key}")
    return changes


def apply_overrides(config: C, overrides: typing.Sequence[str]) -> C:
    """A copy of dataclass ``config`` with ``field=value`` strings applied (types follow the annotations)."""
    return dataclasses.replace(config, **parse_overrides(type(config), overrides))


def apply_values(config: C, values: dict[str, Any]) -> C:
    """A copy of dataclass ``config`` with ``values`` set, each checked against its field's annotation."""
    names = [f.name for f in dataclasses.fields(config)]
    for key in values:
        if key not in names:
            raise ValueError(f"{type(config).__name__} has no field {key!r}.{suggest(key, names)}")
    return config_from_dict(type(config), {**config_to_dict(config), **values})


def config_to_dict(config: Any) -> dict:
    """Plain, JSON-serialisable dict of a dataclass config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type[C], data: dict) -> C:
    """Rebuild a dataclass config, restoring tuples and rejecting unknown fields and values of the wrong type."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} settings must be a mapping of field names to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    unknown = set(data) - {f.name for f in fields}
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)} (config from another diffrl version?)")
    missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{cls.__name__} settings lack the fields {missing}")
    values = {}
    for key, value in data.items():
        value = check_value(value, hints[key], f"{cls.__name__}.{key}")
        if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        values[key] = value
    return cls(**values)
