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
import json
import time
import types
import typing
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar


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


def event(type_name: str, schema_version: int):
    """Class decorator: register a payload dataclass as event ``type_name`` at ``schema_version``."""

    def register(cls: type[E]) -> type[E]:
        key = (type_name, schema_version)
        if key in _REGISTRY:
            raise RuntimeError(f"event {key} registered twice")
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
    return Envelope(cls.EVENT_TYPE, cls.SCHEMA_VERSION, uuid.uuid4().hex, time.time(), producer, payload)


def encode(envelope: Envelope) -> bytes:
    return json.dumps(
        {
            "type": envelope.type,
            "schema_version": envelope.schema_version,
            "event_id": envelope.event_id,
            "produced_at": envelope.produced_at,
            "producer": envelope.producer,
            "payload": dataclasses.asdict(envelope.payload),
        },
        separators=(",", ":"),
        allow_nan=False,
    ).encode()


def decode(raw: bytes, expect: type[E] | None = None) -> Envelope:
    """Parse and validate one record; ``expect`` restricts it to one payload class."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EnvelopeError("envelope must be a JSON object")
    missing = {"type", "schema_version", "event_id", "produced_at", "producer", "payload"} - doc.keys()
    if missing:
        raise EnvelopeError(f"envelope lacks {sorted(missing)}")
    key = (doc["type"], doc["schema_version"])
    cls = _REGISTRY.get(key)
    if cls is None:
        raise EnvelopeError(f"unknown event type/schema version {key}")
    if expect is not None and cls is not expect:
        raise EnvelopeError(f"expected {expect.EVENT_TYPE} event, got {doc['type']}")  # type: ignore[attr-defined]
    if not isinstance(doc["payload"], dict):
        raise EnvelopeError("payload must be a JSON object")
    payload = from_dict(cls, doc["payload"])
    return Envelope(doc["type"], doc["schema_version"], str(doc["event_id"]), float(doc["produced_at"]),
                    str(doc["producer"]), payload)


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    # get_type_hints is slow; every record of a topic is decoded, so resolve each class once.
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def from_dict(cls: type[E], data: dict[str, Any]) -> E:
    """Build a payload dataclass from JSON data, checking field names and basic types."""
    hints, fields = _schema(cls)
    unknown = set(data) - set(fields)
    if unknown:
        raise EnvelopeError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise EnvelopeError(f"{cls.__name__}: missing field {name!r}")
            continue
        kwargs[name] = _check(cls.__name__, name, data[name], hints[name])
    return cls(**kwargs)


def _check(owner: str, name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(owner, name, value, inner[0])
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise EnvelopeError(f"{owner}.{name}: expected a list")
        return [_check(owner, name, v, args[0]) for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise EnvelopeError(f"{owner}.{name}: expected an object")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise EnvelopeError(f"{owner}.{name}: expected an object")
        return from_dict(hint, value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise EnvelopeError(f"{owner}.{name}: expected {hint.__name__}, got {type(value).__name__}")
    return value
