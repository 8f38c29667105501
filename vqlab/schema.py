"""Typed, frozen config dataclasses <-> plain dicts, with errors that name the key.

Every config section is a frozen dataclass. ``parse(cls, data)`` builds one from a dict
(read from YAML or made in a notebook) and checks every value against the field's annotation;
``to_dict(cfg)`` is its exact inverse. A section whose class defines ``variant(name)`` is
polymorphic: its ``name`` key selects the concrete class (a quantizer or a backbone owns its
own config class that way).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union

from vqlab.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config value is unknown, mistyped or impossible. ``key`` is its dotted path."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``condition`` holds; for ``__post_init__``."""
    if not condition:
        raise ConfigError(key, message)


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(key, "; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, args[0], f"{key} (a key)"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"expected a list of {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        try:
            return parse(tp, value)
        except ConfigError as err:
            raise err.under(key) from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads "1e-4" (no dot) as a string; accept numeric strings for float fields only.
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        else:
            number = float(value)
        # No option means anything with inf or NaN; "off" is spelled 0 where an option has it.
        if not math.isfinite(number):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config annotation {_describe(tp)}")


def _concrete_class(cls: type, data: dict[str, Any]) -> type:
    variant = getattr(cls, "variant", None)
    if variant is None:
        return cls
    name = data.get("name", next(f.default for f in dataclasses.fields(cls) if f.name == "name"))
    if not isinstance(name, str):
        raise ConfigError("name", f"expected a string, got {name!r}")
    try:
        return variant(name)
    except KeyError as err:
        raise ConfigError("name", str(err.args[0])) from None


def parse(cls: type[T], data: dict[str, Any]) -> T:
    """Build the dataclass ``cls`` from ``data``; unknown keys and wrong types name their key."""
    if not isinstance(data, dict):
        raise ConfigError("", f"expected a mapping, got {type(data).__name__}")
    cls = _concrete_class(cls, data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(unknown[0], f"unknown key; valid keys: {', '.join(fields)}")
    values = {name: _coerce(value, hints[name], name) for name, value in data.items()}
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Inverse of ``parse``: nested plain dicts, lists and scalars, in field order."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def section_class(root: type, data: dict[str, Any], path: list[str]) -> type | None:
    """The config class at dotted ``path`` below ``root`` given the raw ``data`` (whose ``name``
    keys select variants on the way down); ``None`` if the path is not a section."""
    cls: Any = root
    node: Any = data
    for part in path:
        if not dataclasses.is_dataclass(cls):
            return None
        cls = _concrete_class(cls, node if isinstance(node, dict) else {})
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return cls if dataclasses.is_dataclass(cls) else None
