"""Typed JSON records: dataclasses that check a JSON object on the way in and give it back on the way out.

A :class:`Record` subclass declares the keys it knows as dataclass fields with ordinary annotations
(``str``, ``int``, ``float``, ``bool``, ``X | None``, ``list[X]``, ``dict[str, X]``, ``Any`` or another
record). :meth:`Record.from_dict` checks a parsed JSON object against them and builds the dataclass, or
raises :class:`SchemaError` naming the first key that is missing or of the wrong JSON type, with its
dotted path (``models[0].manifest.dtype``). :meth:`Record.to_dict` gives the JSON object back.

- A field without a default is a required key; a field with a default may be absent.
- ``float`` means "a number" (JSON integers pass and stay integers); booleans never pass as numbers.
- Keys a record does not declare are kept verbatim in ``extra`` and written back, so a file from a
  newer edgedeploy (or a measurement that has no typed field yet) survives a load and a rewrite.
- Optional fields that are ``None`` (and default to ``None``) are left out of the JSON.
- A record whose ``EMPTY_IS_NONE`` is true reads ``{}`` as "no data" (None).

Validation walks the declared fields, never the data, so its depth is the schema's however deeply a
file nests; values kept in ``extra`` or typed ``Any`` are not walked at all.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar, Self


class SchemaError(ValueError):
    """A JSON value does not match a record: the message names the key and what was wrong."""


def describe(value: Any) -> str:
    """The JSON type of ``value`` in words, for messages ("a string", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "a boolean"
    for kind, name in ((dict, "an object"), (list, "a list"), (str, "a string"), (int, "an integer")):
        if isinstance(value, kind):
            return name
    return "a number"


@dataclass(frozen=True)
class _Type:
    """One field's annotation, parsed once: what JSON it accepts and how to build the value."""

    kind: str  # "any", "str", "int", "float", "bool", "list", "dict", "record"
    nullable: bool = False
    item: _Type | None = None  # list items, dict values
    record: type[Record] | None = None

    @property
    def name(self) -> str:
        base = {"any": "anything", "str": "a string", "int": "an integer", "float": "a number",
                "bool": "a boolean", "list": "a list", "dict": "an object", "record": "an object"}[self.kind]
        return f"{base} or null" if self.nullable else base


def _parse(annotation: Any) -> _Type:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported union {annotation!r}: only X | None")
        return dataclasses.replace(_parse(rest[0]), nullable=True)
    if annotation is Any:
        return _Type("any", nullable=True)
    if origin is list:
        return _Type("list", item=_parse(args[0]))
    if origin is dict:
        return _Type("dict", item=_parse(args[1]))
    if isinstance(annotation, type) and issubclass(annotation, Record):
        return _Type("record", record=annotation)
    for kind in (str, int, float, bool):
        if annotation is kind:
            return _Type(kind.__name__)
    raise TypeError(f"unsupported field type {annotation!r}")


@dataclass(frozen=True)
class _Field:
    name: str
    type: _Type
    required: bool
    omit_none: bool


@cache
def _fields(cls: type[Record]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append(_Field(f.name, _parse(hints[f.name]), required, f.default is None))
    return tuple(out)


def _label(where: str) -> str:
    return f"'{where}'" if where else "the file"


def _convert(value: Any, t: _Type, where: str) -> Any:
    if value is None:
        if t.nullable:
            return None
        raise SchemaError(f"{_label(where)} must be {t.name}, got null")
    if t.kind == "any":
        return value
    if t.kind == "record":
        assert t.record is not None
        return t.record.from_dict(value, where)
    if t.kind == "list":
        if not isinstance(value, list):
            raise SchemaError(f"{_label(where)} must be {t.name}, got {describe(value)}")
        assert t.item is not None
        return [_convert(v, t.item, f"{where}[{i}]") for i, v in enumerate(value)]
    if t.kind == "dict":
        if not isinstance(value, dict):
            raise SchemaError(f"{_label(where)} must be {t.name}, got {describe(value)}")
        assert t.item is not None
        return {k: _convert(v, t.item, f"{where}.{k}") for k, v in value.items()}
    ok = {"str": isinstance(value, str), "bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, int | float) and not isinstance(value, bool)}[t.kind]
    if not ok:
        raise SchemaError(f"{_label(where)} must be {t.name}, got {describe(value)}")
    return value


def _encode(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


@dataclass(kw_only=True)
class Record:
    """Base of the typed records; see the module docstring for the rules."""

    #: Keys of the JSON object this record does not declare, kept as they came and written back.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: Whether ``{}`` stands for "no data" (the field holding this record then reads None).
    EMPTY_IS_NONE: ClassVar[bool] = False

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Self:
        """Check ``data`` (a parsed JSON value) and build the record; :class:`SchemaError` otherwise.

        ``where`` is the dotted path of ``data`` in its file, for messages. A record whose
        ``EMPTY_IS_NONE`` is true returns None for ``{}`` (its callers' fields are then ``X | None``).
        """
        if not isinstance(data, dict):
            raise SchemaError(f"{_label(where)} must be an object, got {describe(data)}")
        if cls.EMPTY_IS_NONE and not data:
            return None  # type: ignore[return-value]
        prefix = f"{where}." if where else ""
        fields = _fields(cls)
        missing = next((f.name for f in fields if f.required and f.name not in data), None)
        if missing is not None:
            raise SchemaError(f"missing key '{prefix}{missing}'")
        known = {f.name for f in fields}
        values = {f.name: _convert(data[f.name], f.type, prefix + f.name) for f in fields if f.name in data}
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: declared fields in order (None optionals left out), then ``extra``."""
        out: dict[str, Any] = {}
        for f in _fields(type(self)):
            value = getattr(self, f.name)
            if value is None and f.omit_none:
                continue
            out[f.name] = _encode(value)
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out


def find_problem(value: Any, cls: type[Record]) -> str | None:
    """The first place where ``value`` departs from ``cls``, in words, or None when it matches."""
    try:
        cls.from_dict(value)
    except SchemaError as e:
        return str(e)
    return None
