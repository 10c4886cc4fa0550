"""The envelope codec (orjson + per-class compiled field readers/writers) against the contract the
stdlib-json version had: same JSON document, same refusals, and no crash on hostile records."""

import dataclasses
import json
import math

import numpy as np
import pytest

from shared.events import (
    CompletionEvent,
    FeedbackEvent,
    Message,
    PolicyUpdateEvent,
    RatedResponse,
    RejectedFeedbackEvent,
    RewardModelEvent,
    Timings,
)
from shared.kafka.envelope import EnvelopeError, decode, encode, wrap


def _completion(**over) -> CompletionEvent:
    base = dict(
        request_id="r",
        response_id="resp",
        index=0,
        n=1,
        policy_version="policy-0001",
        model="m",
        source="user",
        messages=[Message("user", "héllo ✓")],
        prompt_token_ids=[1, 2],
        completion_text="yo",
        token_ids=[3],
        logprobs=[-0.5, -1.25],
        finish_reason="stop",
        sampling={"temperature": 1.0},
        timings=Timings(0.0, 0.1, 0.2),
        created_at=1.0,
    )
    base.update(over)
    return CompletionEvent(**base)


def _feedback() -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id="f1",
        kind="pairwise",
        user_id="u",
        target="pairwise:a,b",
        revision=2,
        supersedes="f0",
        responses=[RatedResponse("a", "policy-0001", "p"), RatedResponse("b", "policy-0002", "p")],
        preferred="a",
        tags=["harmful"],
        received_at=12.5,
    )


PAYLOADS = [
    _completion(),
    _completion(logprobs=None),
    _feedback(),
    PolicyUpdateEvent(version="policy-0002", manifest_sha256="ab"),
    RejectedFeedbackEvent(reason="bad", param=None, raw="{", source="http", received_at=1.0),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_the_record_is_the_document_stdlib_json_wrote_and_reads_back_equal(payload):
    env = wrap(payload, "svc")
    raw = encode(env)
    assert json.loads(raw) == {
        "type": env.type,
        "schema_version": env.schema_version,
        "event_id": env.event_id,
        "produced_at": env.produced_at,
        "producer": "svc",
        "payload": dataclasses.asdict(payload),
    }
    back = decode(raw)
    assert back.payload == payload and back.event_id == env.event_id


def test_numpy_floats_and_integer_keys_are_written_as_json_would():
    raw = encode(
        wrap(
            RewardModelEvent(
                version="rm-0002", manifest_sha256="ab", metrics={"loss": np.float64(0.25), 3: [np.float64(1.5)]}
            ),
            "reward",
        )
    )
    assert json.loads(raw)["payload"]["metrics"] == {"loss": 0.25, "3": [1.5]}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_anywhere(bad):
    with pytest.raises(ValueError):
        encode(wrap(_completion(created_at=bad), "inference"))
    with pytest.raises(ValueError):
        encode(wrap(_completion(sampling={"temperature": bad}), "inference"))
    with pytest.raises(ValueError):
        encode(wrap(RewardModelEvent(version="rm", manifest_sha256="ab", metrics={"m": [bad]}), "reward"))


def _doc(**over) -> bytes:
    doc = json.loads(encode(wrap(_feedback(), "feedback")))
    for key, value in over.items():
        if key.startswith("payload_"):
            doc["payload"][key[len("payload_") :]] = value
        else:
            doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "raw, message",
    [
        (_doc(schema_version=[1]), "unknown event type"),
        (_doc(type={"a": 1}), "unknown event type"),
        (_doc(produced_at="yesterday"), "produced_at"),
        (_doc(payload_revision=2.5), "FeedbackEvent.revision: expected int"),
        (_doc(payload_revision=True), "FeedbackEvent.revision: expected int"),
        (_doc(payload_responses={"a": 1}), "FeedbackEvent.responses: expected a list"),
        (_doc(payload_responses=["a"]), "FeedbackEvent.responses: expected an object"),
        (_doc(payload_responses=[{"response_id": "a"}]), "missing field 'policy_version'"),
        (_doc(payload_tags=[1]), "FeedbackEvent.tags: expected str"),
        (
            b'{"type":"feedback","schema_version":1,"event_id":"e","produced_at":NaN,"producer":"p","payload":{}}',
            "not JSON",
        ),
    ],
)
def test_hostile_records_are_refused_with_a_reason_never_a_crash(raw, message):
    with pytest.raises(EnvelopeError, match=message):
        decode(raw)


def test_optional_fields_take_null_and_ints_widen_to_floats():
    back = decode(_doc(payload_supersedes=None, payload_received_at=7)).payload
    assert back.supersedes is None
    assert back.received_at == 7.0 and isinstance(back.received_at, float)
