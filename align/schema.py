"""Typed settings: a dataclass is the schema, and its fields document themselves.

Stages, model sources and the recipe's own sections declare their settings as dataclasses whose fields
carry a ``help`` text (:func:`setting`). :func:`build` turns the plain values read from YAML into such a
dataclass, and every mistake becomes an :class:`~align.AlignError` that names the key path, what was
expected and, for an unknown key, the nearest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

from align.errors import AlignError

__all__ = ["build", "describe", "did_you_mean", "reject_unknown_keys", "setting", "to_plain", "type_name"]

T = TypeVar("T")


def setting(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation: say what the setting changes, not just its name."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def reject_unknown_keys(data: Mapping[str, Any], known: Iterable[str], path: str) -> None:
    """Raise for the first key of ``data`` that is not in ``known``, suggesting the nearest."""
    known = list(known)
    for key in data:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise AlignError(
                f"unknown key '{where}'{did_you_mean(str(key), known)}",
                hint=f"known keys here: {', '.join(known)}",
            )


def build(cls: type[T], data: Any, path: str) -> T:
    """Validate ``data`` (a mapping read from YAML) against the dataclass ``cls`` and build it."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise AlignError(f"{path or 'the recipe'}: expected a mapping of settings, got {_shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    reject_unknown_keys(data, fields, path)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        where = f"{path}.{name}" if path else name
        if name in data:
            values[name] = _convert(data[name], hints[name], where)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise AlignError(f"'{where}' is required: {field.metadata.get('help', '')}".rstrip(": "))
    return cls(**values)


def to_plain(value: Any) -> Any:
    """A dataclass (nested or not) as plain dicts and lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def describe(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) for each field of ``cls``: the source of generated documentation."""
    hints = typing.get_type_hints(cls)
    rows = []
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "required"
        rows.append((field.name, type_name(hints[field.name]), default, field.metadata.get("help", "")))
    return rows


def type_name(tp: Any) -> str:
    """A reader's name for a type hint: ``int``, ``'a' | 'b'``, ``list of str``, ``str or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_name(args[1])}" if args else "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, path)
            except AlignError:
                continue
        raise _wrong_type(path, tp, value)
    if origin is Literal:
        if value in args:
            return value
        choices = ", ".join(repr(a) for a in args)
        raise AlignError(
            f"'{path}' must be one of {choices}; got {_shown(value)}"
            + (did_you_mean(value, map(str, args)) if isinstance(value, str) else "")
        )
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(path, tp, value)
        item = args[0] if args else Any
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _wrong_type(path, tp, value)
        item = args[1] if args else Any
        return {str(k): _convert(v, item, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept what any reader would call a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema using a type this module does not know is a bug
        raise TypeError(f"schema type {tp!r} at {path} is not supported")
    raise _wrong_type(path, tp, value)


def _wrong_type(path: str, tp: Any, value: Any) -> AlignError:
    return AlignError(f"'{path}' must be {type_name(tp)}; got {_shown(value)}")


def _shown(value: Any) -> str:
    kind = {dict: "a mapping", list: "a list", type(None): "nothing (null)"}.get(type(value))
    return kind or f"{value!r} ({type(value).__name__})"
