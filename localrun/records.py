"""Typed records: frozen dataclasses whose fields are declared once (type, default, bounds, help text and
the settings' Meta) and checked when a record is built from outside data: flags, /set, the web UI's form,
catalog manifests, API requests.

Why not pydantic, which these records replaced: importing it and building the settings and catalog models
took about 0.2 s of the 1.1 s a `localrun chat -p ...` spends in all, more than any other step before the
model loads. The checks needed here are few (numbers with bounds, literals, patterns, tuples, nested
records, unknown keys refused), and this module does them in about 0.01 s. The API server's request
bodies stay pydantic models: FastAPI is built on them, and the server starts once.

A record class:

    class Person(Record):
        name: str = setting(help="Who.", pattern=r"^\\w+$")
        age: int | None = setting(None, ge=0, help="Years (unset: unknown).")

`build(Person, data)` checks a dict (RecordError names the field and what is wrong); the constructor
checks keyword arguments the same way; `record.replace(age=3)` is a checked copy.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

_MISSING = dataclasses.MISSING
_TRUE = frozenset({"true", "yes", "on", "1", "y", "t"})
_FALSE = frozenset({"false", "no", "off", "0", "n", "f"})


class RecordError(ValueError):
    """A value that does not fit its field: loc is the field's path (models.0.name), msg says why."""

    def __init__(self, loc: str, msg: str) -> None:
        super().__init__(f"{loc}: {msg}")
        self.loc, self.msg = loc, msg


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    """What a field's value must satisfy beyond its type, and how it describes itself."""

    help: str = ""
    meta: Any = None  # settings.Meta: how a setting presents itself in the CLI and the UI
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    pattern: str | None = None
    min_items: int | None = None


def setting(
    default: Any = _MISSING,
    *,
    help: str = "",
    meta: Any = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    pattern: str | None = None,
    min_items: int | None = None,
) -> Any:
    """A record field: its default (none: required), help text, Meta and bounds."""
    check = Check(help, meta, ge, gt, le, pattern, min_items)
    return dataclasses.field(default=default, metadata={"check": check})


@dataclasses.dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a record class, resolved: kind is its type without `| None`."""

    name: str
    kind: Any
    optional: bool
    default: Any
    check: Check

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    @property
    def is_list(self) -> bool:
        """A tuple of plain values (stop strings): a repeated flag, one per line in the UI."""
        return get_origin(self.kind) is tuple and not _is_record(get_args(self.kind)[0])


class Record:
    """Base of the record classes: each subclass becomes a frozen, keyword-only dataclass whose values
    are checked (and coerced: "12" for an int field) when it is built."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True, kw_only=True)(cls)

    def __post_init__(self) -> None:
        for spec in fields(type(self)).values():
            value = getattr(self, spec.name)
            checked = _check(spec, value, spec.name)
            if checked is not value:
                object.__setattr__(self, spec.name, checked)

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed, checked (RecordError on a bad value or an unknown name)."""
        return build(type(self), {**as_dict(self), **changes})


def _is_record(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Record)


@functools.cache
def fields(cls: type) -> dict[str, FieldSpec]:
    """The fields of a record class in declaration order, their types resolved."""
    hints = typing.get_type_hints(cls)
    out: dict[str, FieldSpec] = {}
    for f in dataclasses.fields(cls):
        kind, optional = _unwrap(hints[f.name])
        check = f.metadata.get("check") or Check()
        out[f.name] = FieldSpec(f.name, kind, optional, f.default, check)
    return out


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) for `X | None` or X."""
    args = get_args(annotation)
    if type(None) in args and get_origin(annotation) is not Literal:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return annotation, False


def as_dict(record: Record) -> dict[str, Any]:
    """The record's values by field name (nested records stay records)."""
    return {name: getattr(record, name) for name in fields(type(record))}


def build(cls: type, data: Mapping[str, Any], loc: str = "") -> Any:
    """A record of class cls from a mapping: unknown and missing names and bad values raise RecordError."""
    if not isinstance(data, Mapping):
        raise RecordError(loc or "value", "Input should be an object")
    specs = fields(cls)
    for key in data:
        if key not in specs:
            raise RecordError(_join(loc, key), "Extra inputs are not permitted")
    for name, spec in specs.items():
        if spec.required and name not in data:
            raise RecordError(_join(loc, name), "Field required")
    try:
        return cls(**data)  # __post_init__ checks and coerces each value, naming the field
    except RecordError as exc:  # its path below this record: put this record's in front
        raise RecordError(_join(loc, exc.loc), exc.msg) from None


def _join(loc: str, name: object) -> str:
    return f"{loc}.{name}" if loc else str(name)


def _check(spec: FieldSpec, value: Any, where: str) -> Any:
    if value is None:
        if spec.optional:
            return None
        raise RecordError(where, f"Input should be {_describe(spec.kind)}")
    value = _coerce(spec.kind, value, where)
    _bounds(spec.check, value, where)
    return value


def _coerce(kind: Any, value: Any, where: str) -> Any:
    """value as kind, converting text the way a form or a flag writes it; RecordError if it cannot be."""
    origin = get_origin(kind)
    if kind is Any:
        return value
    if origin is Literal:
        if value in get_args(kind) and not isinstance(value, bool):
            return value
        raise RecordError(where, f"Input should be {_describe(kind)}")
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise RecordError(where, "Input should be a valid tuple")
        item = get_args(kind)[0]
        out = tuple(_coerce(item, v, _join(where, i)) for i, v in enumerate(value))
        return value if out == value and type(value) is tuple else out
    if origin is typing.Union:
        for option in get_args(kind):
            try:
                return _coerce(option, value, where)
            except RecordError:
                pass
        raise RecordError(where, f"Input should be {_describe(kind)}")
    if _is_record(kind):
        return value if isinstance(value, kind) else build(kind, value, where)
    if kind is bool:
        return _as_bool(value, where)
    if kind is int:
        return _as_int(value, where)
    if kind is float:
        return _as_float(value, where)
    if kind is str:
        if isinstance(value, str):
            return value
        raise RecordError(where, "Input should be a valid string")
    if isinstance(value, kind):
        return value
    raise RecordError(where, f"Input should be {_describe(kind)}")


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RecordError(where, "Input should be a valid boolean")


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise RecordError(where, "Input should be a valid integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise RecordError(where, "Input should be a valid integer")


def _as_float(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise RecordError(where, "Input should be a valid number")


def _bounds(check: Check, value: Any, where: str) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if check.ge is not None and not value >= check.ge:
            raise RecordError(where, f"Input should be greater than or equal to {_num(check.ge)}")
        if check.gt is not None and not value > check.gt:
            raise RecordError(where, f"Input should be greater than {_num(check.gt)}")
        if check.le is not None and not value <= check.le:
            raise RecordError(where, f"Input should be less than or equal to {_num(check.le)}")
    if check.pattern is not None and isinstance(value, str) and not re.search(check.pattern, value):
        raise RecordError(where, f"String should match pattern '{check.pattern}'")
    if check.min_items is not None and isinstance(value, tuple) and len(value) < check.min_items:
        raise RecordError(where, f"Should have at least {check.min_items} item{'s' * (check.min_items != 1)}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _describe(kind: Any) -> str:
    """What kind asks for, in the words of an error message."""
    if get_origin(kind) is Literal:
        names = [repr(a) for a in get_args(kind)]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if get_origin(kind) is typing.Union:
        return " or ".join(_describe(k) for k in get_args(kind))
    words = {bool: "a valid boolean", int: "a valid integer", float: "a valid number", str: "a valid string"}
    if kind in words:
        return words[kind]
    if get_origin(kind) is tuple:
        return "a valid tuple"
    return "an object" if _is_record(kind) else f"a {getattr(kind, '__name__', kind)}"
