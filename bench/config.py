"""Typed, validated configuration objects.

Every config in dfkd-bench (method hyperparameters, grids, teacher recipes) is a dataclass. Values
coming from YAML or the command line go through :func:`from_mapping`, which checks every key and
type and raises :class:`ConfigError` naming where the value came from, the key, the bad value and
what would have been valid. No config ever executes code.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _integral(value: Any) -> int | None:
    """``value`` as an int when it is a whole number written as a float or in scientific notation, else None."""
    if isinstance(value, str):  # only YAML's unquoted scientific notation (1e7); a quoted "3" stays a string
        if "e" not in value.lower():
            return None
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` checked (and lightly coerced: int->float, list->tuple) against ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                takes_mapping = dataclasses.is_dataclass(option) or get_origin(option) is dict
                if isinstance(value, Mapping) and takes_mapping:
                    errors.append(exc)  # the value is a mapping: this option's complaint is the precise one
        if errors:
            raise errors[-1]
        names = " | ".join(_type_name(a) for a in get_args(tp))
        raise ConfigError(f"{where}: {value!r} is not a valid {names}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in get_args(tp))}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = get_args(tp) or (Any, Any)
        return {_coerce(k, key_type, f"{where} key"): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_mapping(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _integral(value)  # 1e7 (YAML reads it as a string) or 1.0e+7 (a float): budgets at API scale
        if number is not None:
            return number
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, validating every key and value.

    Unknown keys, missing required keys and wrong types raise :class:`ConfigError` with
    ``where`` (e.g. ``"grids/quick.yaml: methods[2].params"``) and the valid keys.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain JSON-able data (tuples become lists)."""
    return _plain(dataclasses.asdict(obj))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def replace(obj: T, overrides: Mapping[str, Any], where: str) -> T:
    """``obj`` with ``overrides`` applied, validated like :func:`from_mapping`."""
    merged = {**dataclasses.asdict(obj), **dict(overrides)}
    return from_mapping(type(obj), merged, where)
