"""Typed settings: a dataclass is the schema, and its fields document themselves.

Stages, model sources and the recipe's own sections declare their settings as dataclasses whose fields
carry a ``help`` text and, for numbers, the range they must lie in (:func:`setting`). :func:`build` turns
the plain values read from YAML into such a dataclass, and every mistake becomes an
:class:`~align.AlignError` that names the key path, what was expected and, for an unknown key, the nearest
known one. A value out of range is refused there, before any work: ``'stages.dpo.beta' must be above 0;
got -1.0``, rather than as a crash (or a run reported "done") minutes later.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

from align.errors import AlignError

__all__ = [
    "MAX_SEED",
    "Bounds",
    "NoOptions",
    "bounds_of",
    "build",
    "check_bounds",
    "describe",
    "did_you_mean",
    "reject_unknown_keys",
    "setting",
    "to_plain",
    "type_name",
]

T = TypeVar("T")
Number = int | float

#: The largest seed: numpy's, which transformers' ``set_seed`` also sets, must fit in 32 bits.
MAX_SEED = 2**32 - 1


@dataclass
class NoOptions:
    """The ``Config`` of a plugin that takes no options."""


@dataclass(frozen=True)
class Bounds:
    """The range a numeric setting must lie in, declared with :func:`setting`.

    :param minimum: the lowest value allowed (inclusive).
    :param maximum: the highest value allowed (inclusive).
    :param above: every value must be greater than this (exclusive).
    :param below: every value must be less than this (exclusive).
    :param special: values outside the range that mean something, with what they mean
        (``((-1, "train for `epochs` instead"),)``).
    """

    minimum: Number | None = None
    maximum: Number | None = None
    above: Number | None = None
    below: Number | None = None
    special: tuple[tuple[Number, str], ...] = ()

    def __post_init__(self) -> None:
        # A schema that says "at least 0 and above 0" is a bug in the schema, not the user's mistake.
        if self.minimum is not None and self.above is not None:
            raise TypeError("a setting takes minimum= or above=, not both")
        if self.maximum is not None and self.below is not None:
            raise TypeError("a setting takes maximum= or below=, not both")
        if all(b is None for b in (self.minimum, self.maximum, self.above, self.below)):
            raise TypeError("special= values are exceptions to a range: give minimum=, maximum=, above= or below=")

    def allows(self, value: Number) -> bool:
        """Whether ``value`` lies in the range or is one of the special values. NaN never does."""
        if any(value == special for special, _ in self.special):
            return True
        # Written so that every comparison with NaN fails: a NaN learning rate is never in range.
        return (
            (self.minimum is None or value >= self.minimum)
            and (self.above is None or value > self.above)
            and (self.maximum is None or value <= self.maximum)
            and (self.below is None or value < self.below)
        )

    def __str__(self) -> str:
        """The range in symbols, as ``align explain`` shows it: ``≥ 1``, ``> 0``, ``in [0, 1)``, ``≥ 1 or -1 (…)``."""
        low = self.minimum if self.minimum is not None else self.above
        high = self.maximum if self.maximum is not None else self.below
        if low is not None and high is not None:
            shown = f"in {'[' if self.minimum is not None else '('}{_number(low)}, {_number(high)}"
            shown += "]" if self.maximum is not None else ")"
        elif low is not None:
            shown = f"{'≥' if self.minimum is not None else '>'} {_number(low)}"
        else:
            assert high is not None  # a Bounds has at least one end (see bounds_of)
            shown = f"{'≤' if self.maximum is not None else '<'} {_number(high)}"
        return shown + "".join(f" or {_number(value)} ({meaning})" for value, meaning in self.special)

    def wording(self) -> str:
        """The range in words, for errors: ``at least 1, or -1 (…)``, ``above 0 and at most 1``."""
        parts = []
        if self.minimum is not None:
            parts.append(f"at least {_number(self.minimum)}")
        if self.above is not None:
            parts.append(f"above {_number(self.above)}")
        if self.maximum is not None:
            parts.append(f"at most {_number(self.maximum)}")
        if self.below is not None:
            parts.append(f"below {_number(self.below)}")
        return " and ".join(parts) + "".join(f", or {_number(v)} ({meaning})" for v, meaning in self.special)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Any = dataclasses.MISSING,
    minimum: Number | None = None,
    maximum: Number | None = None,
    above: Number | None = None,
    below: Number | None = None,
    special: Mapping[Number, str] | None = None,
) -> Any:
    """A dataclass field with its documentation: say what the setting changes, not just its name.

    A numeric setting also says the range it must lie in, so that :func:`build` refuses a value outside it
    before any work and ``align explain`` shows it (``steps: int ≥ 1 = 100``): ``minimum`` and ``maximum``
    are inclusive, ``above`` and ``below`` exclusive, and ``special`` lists values outside the range that
    mean something (``special={-1: "train for `epochs` instead"}``). For a list of numbers, the range
    applies to each of them.
    """
    metadata: dict[str, Any] = {"help": help}
    if any(b is not None for b in (minimum, maximum, above, below)) or special:
        metadata["bounds"] = Bounds(minimum, maximum, above, below, tuple((special or {}).items()))
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def bounds_of(field: dataclasses.Field[Any]) -> Bounds | None:
    """The range a field's :func:`setting` declares, or ``None`` for a field without one."""
    return field.metadata.get("bounds")


def check_bounds(instance: Any, path: str = "") -> None:
    """Refuse a dataclass instance (built in code, not by :func:`build`) whose numbers are out of range.

    :func:`build` checks every value as it reads it; a ``__post_init__`` calls this for settings that are
    also made directly, e.g. from command-line options.
    """
    for field in dataclasses.fields(instance):
        _check_range(getattr(instance, field.name), bounds_of(field), f"{path}.{field.name}" if path else field.name)


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
            _check_range(values[name], bounds_of(field), where)
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


def describe(cls: type, nested: bool = False, _seen: set[type] | None = None) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) for each field of ``cls``: the source of generated documentation.

    The type shows the range a number must lie in (``int ≥ 1``). With ``nested``, the fields of settings
    that are mappings of their own follow their parent's row, named by their path: ``score.samples``,
    ``data[].weight`` (``[]``: each item of a list); each settings class once, where it first appears.
    """
    hints = typing.get_type_hints(cls)
    seen = _seen if _seen is not None else {cls}
    rows = []
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "required"
        shown = _bounded_type_name(hints[field.name], bounds_of(field))
        rows.append((field.name, shown, default, field.metadata.get("help", "")))
        for inner, prefix in _dataclasses_in(hints[field.name], field.name) if nested else ():
            if inner not in seen:
                seen.add(inner)
                rows += [
                    (f"{prefix}.{name}", kind, value, text) for name, kind, value, text in describe(inner, True, seen)
                ]
    return rows


def _dataclasses_in(tp: Any, path: str) -> list[tuple[type, str]]:
    """The settings classes a type hint holds, each with its path: ``(ScoreSettings, "score")``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return [found for arm in args for found in _dataclasses_in(arm, path)]
    if origin in (list, tuple) and args:
        return _dataclasses_in(args[0], f"{path}[]")
    return [(tp, path)] if isinstance(tp, type) and dataclasses.is_dataclass(tp) else []


def _bounded_type_name(tp: Any, bounds: Bounds | None) -> str:
    """``int ≥ 1``, ``float in [0, 1] or null``: the type with its range, the range before ``or null``."""
    if bounds is None:
        return type_name(tp)
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args:
        arms = [a for a in args if a is not type(None)]
        inner = arms[0] if len(arms) == 1 else Union[tuple(arms)]  # noqa: UP007 - built from a runtime tuple
        return f"{_bounded_type_name(inner, bounds)} or null"
    return f"{type_name(tp)} {bounds}"


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
        if not args:
            return "list"
        item = type_name(args[0])
        return f"list of ({item})" if " or " in item else f"list of {item}"  # `str or list of (str or mapping)`
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
        arms = [a for a in args if a is not type(None)]
        # The value's shape (list, mapping, scalar) says which arm the user meant; that arm's own error
        # names the real mistake (`unknown key 'data[0].wieght'`), where "must be str or list" would hide it.
        shaped = [a for a in arms if _shape(value) in _shapes(a)]
        if len(shaped) == 1 and (_shapes(shaped[0]) != {"scalar"} or typing.get_origin(shaped[0]) is Literal):
            return _convert(value, shaped[0], path)
        for option in shaped:
            try:
                return _convert(value, option, path)
            except AlignError:
                continue
        if isinstance(value, Mapping):  # one mapping where only a list of them fits: the list's own rule
            listed = [a for a in arms if typing.get_origin(a) in (list, tuple) and _takes_one_mapping(a)]
            if listed:
                return _convert(value, listed[0], path)
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
        item = args[0] if args else Any
        if isinstance(value, Mapping) and _takes_one_mapping(tp):
            # `data: {dataset: x, eval_size: 16}` means a list of one: accept it as written, and report its
            # mistakes at the key the user wrote (`data.wieght`, not `data[0].wieght`).
            return [_convert(value, item, path)]
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(path, tp, value)
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


def _shape(value: Any) -> str:
    """``list``, ``mapping`` or ``scalar``: what YAML gave, which decides the arm of a union it is meant for."""
    if isinstance(value, (list, tuple)):
        return "list"
    return "mapping" if isinstance(value, Mapping) else "scalar"


def _shapes(tp: Any) -> set[str]:
    """The shapes of value that the type hint ``tp`` accepts."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return {"list", "mapping", "scalar"}
    if origin in (Union, types.UnionType):
        return set().union(*(_shapes(a) for a in typing.get_args(tp) if a is not type(None)))
    if origin in (list, tuple):
        return {"list"}
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return {"mapping"}
    return {"scalar"}


def _takes_one_mapping(tp: Any) -> bool:
    """Whether ``tp`` is a list whose items may be mappings (a mapping given alone is then a list of one)."""
    args = typing.get_args(tp)
    return bool(args) and args[0] is not Any and "mapping" in _shapes(args[0])


def _check_range(value: Any, bounds: Bounds | None, path: str) -> None:
    """Refuse a number (or a number in a list) outside ``bounds``; other values are the type check's."""
    if bounds is None or value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if not bounds.allows(value):
            raise AlignError(f"'{path}' must be {bounds.wording()}; got {value!r}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_range(item, bounds, f"{path}[{index}]")


def _number(value: Number) -> str:
    """``1`` for 1.0, ``0.5``, ``1e-05``: a bound as a reader writes it."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def _wrong_type(path: str, tp: Any, value: Any) -> AlignError:
    return AlignError(f"'{path}' must be {type_name(tp)}; got {_shown(value)}")


def _shown(value: Any) -> str:
    kind = {dict: "a mapping", list: "a list", type(None): "nothing (null)"}.get(type(value))
    return kind or f"{value!r} ({type(value).__name__})"
