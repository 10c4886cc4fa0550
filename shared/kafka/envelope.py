"""Versioned event envelopes: every record on every topic is one JSON object

    {"type": "completion", "schema_version": 1, "event_id": "...", "produced_at": 1700000000.0,
     "producer": "inference", "payload": {...}}

``type`` and ``schema_version`` say how to read ``payload``. A reader refuses a schema version it
does not know (newer writers must bump the version when they change the meaning of a field) rather
than misread it. Payloads are plain dataclasses registered with ``@event``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import random
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson


class EnvelopeError(ValueError):
    """A record that is not a valid envelope of a known event type and schema version."""


@dataclass(frozen=True)
class Envelope:
    type: str
    schema_version: int
    event_id: str
    produced_at: float
    producer: str
    payload: Any
    """A registered event dataclass instance."""


E = TypeVar("E")
_REGISTRY: dict[tuple[str, int], type] = {}


def event(type_name: str, schema_version: int) -> Callable[[type[E]], type[E]]:
    """Class decorator: register a payload dataclass as event ``type_name`` at ``schema_version``."""

    def register(cls: type[E]) -> type[E]:
        key = (type_name, schema_version)
        if key in _REGISTRY:
            raise RuntimeError(f"event {key} registered twice")
        # Registration gives the class these two attributes; mypy cannot see a decorator add them.
        cls.EVENT_TYPE = type_name  # type: ignore[attr-defined]
        cls.SCHEMA_VERSION = schema_version  # type: ignore[attr-defined]
        _REGISTRY[key] = cls
        return cls

    return register


def wrap(payload: Any, producer: str) -> Envelope:
    """A new envelope around a registered payload, with a fresh event id."""
    cls = type(payload)
    if (getattr(cls, "EVENT_TYPE", None), getattr(cls, "SCHEMA_VERSION", None)) not in _REGISTRY:
        raise TypeError(f"{cls.__name__} is not a registered event")
    return Envelope(cls.EVENT_TYPE, cls.SCHEMA_VERSION, new_event_id(), time.time(), producer, payload)


def new_event_id() -> str:
    """A random 128-bit id in uuid4's hex form.

    From a generator seeded once per process from os.urandom (and again in a forked child) rather
    than uuid.uuid4(): that reads os.urandom per call, a system call that cost more than the rest of
    wrapping an event. Ids only need to be unique, not unpredictable.
    """
    return "%032x" % (_ids.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)


# What uuid.UUID(int=n, version=4) does to n, without building the UUID object (3x the cost):
# version 4 in bits 76-79, variant 10 (RFC 4122) in bits 62-63.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def encode(envelope: Envelope) -> bytes:
    """The record bytes of an envelope; raises ValueError for NaN or infinite floats (invalid JSON)."""
    return orjson.dumps(
        {
            "type": envelope.type,
            "schema_version": envelope.schema_version,
            "event_id": envelope.event_id,
            "produced_at": _finite(envelope.produced_at),
            "producer": envelope.producer,
            "payload": _writer(type(envelope.payload))(envelope.payload),
        },
        option=orjson.OPT_NON_STR_KEYS,
    )  # as json.dumps: {1: x} is written as {"1": x}


def decode(raw: bytes, expect: type[E] | None = None) -> Envelope:
    """Parse and validate one record; ``expect`` restricts it to one payload class."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:  # also invalid UTF-8, and NaN, which JSON does not have
        raise EnvelopeError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EnvelopeError("envelope must be a JSON object")
    missing = _ENVELOPE_KEYS - doc.keys()
    if missing:
        raise EnvelopeError(f"envelope lacks {sorted(missing)}")
    key = (doc["type"], doc["schema_version"])
    try:
        cls = _REGISTRY.get(key)
    except TypeError:  # an unhashable type or version (a JSON list or object)
        cls = None
    if cls is None:
        raise EnvelopeError(f"unknown event type/schema version {key}")
    if expect is not None and cls is not expect:
        # EVENT_TYPE: set by @event, which mypy cannot see.
        raise EnvelopeError(f"expected {expect.EVENT_TYPE} event, got {doc['type']}")  # type: ignore[attr-defined]
    if not isinstance(doc["payload"], dict):
        raise EnvelopeError("payload must be a JSON object")
    payload: Any = from_dict(cls, doc["payload"])
    try:
        produced_at = float(doc["produced_at"])
    except (TypeError, ValueError):
        raise EnvelopeError("produced_at must be a number") from None
    return Envelope(
        doc["type"], doc["schema_version"], str(doc["event_id"]), produced_at, str(doc["producer"]), payload
    )


_ENVELOPE_KEYS = frozenset({"type", "schema_version", "event_id", "produced_at", "producer", "payload"})


def from_dict(cls: type[E], data: dict[str, Any]) -> E:
    """Build a payload dataclass from JSON data, checking field names and basic types."""
    names, fields = _reader(cls)
    if not names.issuperset(data):
        raise EnvelopeError(f"{cls.__name__}: unknown fields {sorted(set(data) - names)}")
    kwargs: dict[str, Any] = {}
    for name, required, read in fields:
        if name in data:
            kwargs[name] = read(data[name])
        elif required:
            raise EnvelopeError(f"{cls.__name__}: missing field {name!r}")
    return cls(**kwargs)


# Every record of a topic is encoded once and decoded by every reader, so the per-field work is
# resolved once per class (type hints, unions, nested dataclasses) into small functions.

Convert = Callable[[Any], Any]
R = TypeVar("R")


def _per_class(fn: Callable[[type], R]) -> Callable[[type], R]:
    """``functools.cache`` for a function of a class, keeping its signature for the type checker.

    (mypy does not see a class object as Hashable, python/mypy#11470, so a ``type[X]`` argument to a
    bare ``functools.cache`` wrapper is refused.)
    """
    return functools.cache(fn)


@_per_class
def _reader(cls: type) -> tuple[frozenset[str], list[tuple[str, bool, Convert]]]:
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        fields.append((f.name, required, _read_as(f"{cls.__name__}.{f.name}", hints[f.name])))
    return frozenset(f.name for f in dataclasses.fields(cls)), fields


def _identity(value: Any) -> Any:
    return value


def _read_as(where: str, hint: Any) -> Convert:
    """A function that checks one JSON value against ``hint`` (and builds nested dataclasses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _identity
    if origin in (typing.Union, types.UnionType):
        inner = _read_as(where, [a for a in args if a is not type(None)][0])
        if type(None) not in args:
            return inner
        return lambda value: None if value is None else inner(value)
    if origin in (list, tuple):
        item = _read_as(where, args[0]) if args else None

        def read_list(value: Any) -> Any:
            if not isinstance(value, list):
                raise EnvelopeError(f"{where}: expected a list")
            return [item(v) for v in value] if item is not None else value

        return read_list
    if origin is dict or hint is dict or dataclasses.is_dataclass(hint):
        nested = dataclasses.is_dataclass(hint)

        def read_object(value: Any) -> Any:
            if not isinstance(value, dict):
                raise EnvelopeError(f"{where}: expected an object")
            return from_dict(hint, value) if nested else value

        return read_object
    if hint in (int, float, str, bool):

        def read_scalar(value: Any) -> Any:
            if type(value) is hint:
                return value
            if hint is float and type(value) is int:
                return float(value)
            raise EnvelopeError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")

        return read_scalar
    return _identity


# Writers check what JSON cannot hold (NaN, infinities) and convert what orjson refuses (numpy
# floats), and otherwise hand the objects to orjson as they are: it writes dataclasses, lists and
# strings natively. A writer returns its input itself when nothing needed converting, so the common
# record is checked without being copied.


@_per_class
def _writer(cls: type) -> Convert:
    """A function making a payload dataclass JSON-ready (itself, or a dict when a field changed)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    checked = [(f.name, w) for f in dataclasses.fields(cls) if (w := _write_as(hints[f.name])) is not _identity]
    if not checked:
        return _identity

    def write(obj: Any) -> Any:
        out = None
        for name, convert in checked:
            value = getattr(obj, name)
            if value is None:
                continue
            new = convert(value)
            if new is not value:
                if out is None:
                    out = {n: getattr(obj, n) for n in names}
                out[name] = new
        return obj if out is None else out

    return write


def _write_as(hint: Any) -> Convert:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _write_as([a for a in args if a is not type(None)][0])
    if origin in (list, tuple):
        item = _write_as(args[0]) if args else _checked_any
        return _identity if item is _identity else functools.partial(_write_list, item)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _writer(hint)
    if hint is float:
        return _finite
    if hint in (int, str, bool):
        return _identity
    return _checked_any  # dict, Any, ...: whatever is inside may hold a float


def _write_list(item: Convert, value: Any) -> Any:
    out = None
    for i, v in enumerate(value):
        new = item(v)
        if new is not v:
            if out is None:
                out = list(value)
            out[i] = new
    return value if out is None else out


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not valid JSON")
        if type(value) is not float:  # numpy.float64 and other subclasses, which orjson refuses
            return float(value)
    return value


def _checked_any(value: Any) -> Any:
    """Free-form data (dicts, lists) made JSON-ready, refusing NaN and infinities anywhere."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        out = None
        for k, v in value.items():
            new = _checked_any(v)
            if new is not v:
                if out is None:
                    out = dict(value)
                out[k] = new
        return value if out is None else out
    if isinstance(value, (list, tuple)):
        return _write_list(_checked_any, value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _writer(type(value))(value)
    return value
