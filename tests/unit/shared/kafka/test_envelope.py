import json
from dataclasses import dataclass

import pytest

from shared.events import CompletionEvent, Message, PolicyUpdateEvent, Timings
from shared.kafka.envelope import EnvelopeError, decode, encode, event, wrap


def _completion(**over) -> CompletionEvent:
    base = dict(
        request_id="r",
        response_id="resp",
        index=0,
        n=1,
        policy_version="policy-0001",
        model="m",
        source="user",
        messages=[Message("user", "hi")],
        prompt_token_ids=[1, 2],
        completion_text="yo",
        token_ids=[3],
        logprobs=[-0.5],
        finish_reason="stop",
        sampling={"temperature": 1.0},
        timings=Timings(0.0, 0.1, 0.2),
        created_at=1.0,
    )
    base.update(over)
    return CompletionEvent(**base)


def test_roundtrip_keeps_type_version_and_payload():
    env = wrap(_completion(), "inference")
    back = decode(encode(env))
    assert (back.type, back.schema_version, back.producer, back.event_id) == (
        "completion",
        1,
        "inference",
        env.event_id,
    )
    assert back.payload == _completion()
    assert isinstance(back.payload.messages[0], Message)


def test_decode_can_insist_on_one_event_type():
    raw = encode(wrap(PolicyUpdateEvent(version="policy-0002", manifest_sha256="ab"), "trainer"))
    assert decode(raw, expect=PolicyUpdateEvent).payload.version == "policy-0002"
    with pytest.raises(EnvelopeError, match="expected completion event"):
        decode(raw, expect=CompletionEvent)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\xff", "not JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"type": "completion"}', "lacks"),
        (
            json.dumps(
                {
                    "type": "completion",
                    "schema_version": 99,
                    "event_id": "e",
                    "produced_at": 0,
                    "producer": "p",
                    "payload": {},
                }
            ).encode(),
            "unknown event type/schema version",
        ),
    ],
)
def test_invalid_records_are_refused(raw, message):
    with pytest.raises(EnvelopeError, match=message):
        decode(raw)


def test_payload_field_types_and_names_are_checked():
    doc = json.loads(encode(wrap(_completion(), "inference")))
    doc["payload"]["index"] = "zero"
    with pytest.raises(EnvelopeError, match="index: expected int"):
        decode(json.dumps(doc).encode())
    doc = json.loads(encode(wrap(_completion(), "inference")))
    doc["payload"]["surprise"] = 1
    with pytest.raises(EnvelopeError, match="unknown fields"):
        decode(json.dumps(doc).encode())
    doc = json.loads(encode(wrap(_completion(), "inference")))
    del doc["payload"]["response_id"]
    with pytest.raises(EnvelopeError, match="missing field 'response_id'"):
        decode(json.dumps(doc).encode())


def test_unregistered_payload_cannot_be_wrapped_and_types_register_once():
    @dataclass
    class Loose:
        x: int = 0

    with pytest.raises(TypeError):
        wrap(Loose(), "p")
    with pytest.raises(RuntimeError, match="registered twice"):
        event("completion", 1)(Loose)


def test_nan_is_refused_rather_than_written_as_invalid_json():
    with pytest.raises(ValueError):
        encode(wrap(_completion(logprobs=[float("nan")]), "inference"))


def test_event_ids_are_unique_uuid4_hex():
    import uuid

    from shared.kafka.envelope import new_event_id

    ids = [new_event_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:500]:
        parsed = uuid.UUID(hex=text)
        assert parsed.hex == text and len(text) == 32
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
