"""POST /v1/feedback end to end with real parts: real chat responses and their signed tokens, the
gateway, the feedback service over gRPC, and rlhf.feedback on the embedded broker. Every rating is
by an authenticated principal (a test key), and only the principal a response was served to can
rate it."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition

from services.gateway.app import create_app
from shared.feedback_token import TokenClaims, prompt_hash, sign
from shared.kafka.admin import ensure_topics
from shared.kafka.embedded import EmbeddedBroker
from shared.kafka.topics import FEEDBACK, FEEDBACK_DLQ
from tests.conftest import (
    TEST_API_KEYS,
    TEST_TOKEN_SECRET,
    UvicornThread,
    consume_events,
    gateway_config,
    start_broker,
    start_feedback,
)
from tests.integration.conftest import MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def chat(stack, prompt: str, n: int = 1, principal: str = "alice"):
    resp = stack.client(principal).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], n=n, max_tokens=6
    )
    return resp, [(c.model_extra["response_id"], c.model_extra["feedback_token"]) for c in resp.choices]


def as_(principal: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TEST_API_KEYS[principal]}"}


def rate(url: str, body: dict | bytes, headers: dict | None = None, principal: str | None = "alice") -> httpx.Response:
    """POST a rating as ``principal`` (None: with no key, unless ``headers`` carry one)."""
    headers = {**(as_(principal) if principal else {}), **(headers or {})}
    if isinstance(body, dict):
        return httpx.post(url + "/v1/feedback", json=body, headers=headers, timeout=60)
    headers["Content-Type"] = "application/json"
    return httpx.post(url + "/v1/feedback", content=body, headers=headers, timeout=60)


def feedback_events(stack, feedback_ids: set[str], count: int):
    return consume_events(stack.kafka, FEEDBACK, lambda e: e.payload.feedback_id in feedback_ids, count=count)


def end_offsets(kafka, topic: str) -> dict:
    consumer = KafkaConsumer(bootstrap_servers=kafka.servers)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        return consumer.end_offsets(parts)
    finally:
        consumer.close()


def test_every_kind_is_accepted_and_lands_on_kafka_with_the_servers_facts(stack):
    resp, served = chat(stack, "What is 3 plus 4?", n=4)
    (a, ta), (b, tb), (c, tc), (d, td) = served
    user = f"user-{uuid.uuid4().hex[:8]}"
    bodies = [
        {"type": "thumb", "response_id": a, "thumb": "up", "feedback_tokens": [ta]},
        {
            "type": "likert",
            "response_id": b,
            "score": 6,
            "feedback_tokens": [tb],
            "comment": "clear",
            "tags": ["hallucination"],
        },
        {"type": "pairwise", "response_ids": [a, c], "preferred": "b", "feedback_tokens": [tc, ta]},
        {"type": "ranking", "response_ids": [d, c, b, a], "feedback_tokens": [ta, tb, tc, td]},
        {"type": "ranking", "response_ids": [a, b, c], "ranks": [1, 2, 2], "feedback_tokens": [ta, tb, tc]},
    ]
    ids = {}
    for body in bodies:
        r = rate(stack.url, {**body, "user": user})
        assert r.status_code == 200, r.text
        assert r.json()["revision"] == 1 and r.json()["duplicate"] is False
        ids[r.json()["feedback_id"]] = body
    events = {e.payload.feedback_id: e.payload for e in feedback_events(stack, set(ids), count=5)}
    assert set(events) == set(ids)
    ph = prompt_hash([("user", "What is 3 plus 4?")])
    for fid, body in ids.items():
        ev = events[fid]
        assert ev.kind == body["type"] and ev.revision == 1 and ev.supersedes is None
        assert (ev.user_id, ev.label) == ("alice", user), "the voter is the principal; `user` only a label"
        expected_ids = body.get("response_ids") or [body["response_id"]]
        assert [r.response_id for r in ev.responses] == expected_ids
        assert {r.policy_version for r in ev.responses} == {resp.model_extra["policy_version"]}
        assert {r.prompt_hash for r in ev.responses} == {ph}
    for fid, body in ids.items():
        assert events[fid].ranks == body.get("ranks")  # None unless the ranking has ties
    by_kind = {e.kind: e for e in events.values()}
    assert by_kind["thumb"].thumb == "up" and by_kind["likert"].score == 6
    assert by_kind["likert"].comment == "clear" and by_kind["likert"].tags == ["hallucination"]
    assert by_kind["pairwise"].preferred == "b"


def test_forged_expired_unknown_and_cross_prompt_ratings_are_refused(stack):
    before = end_offsets(stack.kafka, FEEDBACK)
    _, [(a, ta)] = chat(stack, "Name a colour.")
    _, [(b, tb)] = chat(stack, "Name an animal.")
    forged = sign("not-the-server-key-0123456789", TokenClaims(a, "policy-0001", "x", int(time.time()) + 99))
    expired = sign(TEST_TOKEN_SECRET, TokenClaims(a, "policy-0001", "x", int(time.time()) - 1))
    cases = [
        ({"type": "thumb", "response_id": a, "thumb": "up", "feedback_tokens": [forged]}, 403, "signature"),
        ({"type": "thumb", "response_id": a, "thumb": "up", "feedback_tokens": [expired]}, 403, "expired"),
        (
            {"type": "thumb", "response_id": "resp-never-served", "thumb": "up", "feedback_tokens": [ta]},
            403,
            "no valid feedback token",
        ),
        ({"type": "thumb", "response_id": a, "thumb": "up", "feedback_tokens": []}, 403, "no valid feedback token"),
        (
            {"type": "pairwise", "response_ids": [a, b], "preferred": "a", "feedback_tokens": [ta, tb]},
            400,
            "different prompts",
        ),
    ]
    for body, status, message in cases:
        r = rate(stack.url, {**body, "user": "mallory"})
        assert r.status_code == status, r.text
        assert message in r.json()["error"]["message"]
        assert r.json()["error"]["param"] in ("feedback_tokens", "response_ids")
    assert end_offsets(stack.kafka, FEEDBACK) == before, "a refused rating reached rlhf.feedback"


def test_policy_version_comes_from_the_token_not_the_client(stack):
    _, [(a, ta)] = chat(stack, "Say hi.")
    r = rate(
        stack.url,
        {
            "type": "thumb",
            "response_id": a,
            "thumb": "up",
            "feedback_tokens": [ta],
            "user": "u",
            "policy_version": "policy-9999",
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "policy_version", "unknown fields are refused"


def test_same_idempotency_key_counts_once(stack):
    _, [(a, ta)] = chat(stack, "Count to two.")
    body = {"type": "thumb", "response_id": a, "thumb": "down", "feedback_tokens": [ta], "user": "retrier"}
    first = rate(stack.url, body, headers={"Idempotency-Key": "key-1"})
    second = rate(stack.url, {**body, "thumb": "up"}, headers={"Idempotency-Key": "key-1"})
    assert first.status_code == second.status_code == 200
    assert second.json() == {**first.json(), "duplicate": True}
    again = rate(stack.url, body)  # no key, but the same vote as the live one: nothing new
    assert again.json()["duplicate"] is True and again.json()["feedback_id"] == first.json()["feedback_id"]
    events = consume_events(stack.kafka, FEEDBACK, lambda e: e.payload.label == "retrier", count=2, timeout=8)
    assert len(events) == 1 and events[0].payload.thumb == "down"


def test_changing_a_vote_supersedes_it(stack):
    _, [(a, ta)] = chat(stack, "Tell a fact.")
    body = {"type": "thumb", "response_id": a, "feedback_tokens": [ta], "user": "changer"}
    up = rate(stack.url, {**body, "thumb": "up"}).json()
    down = rate(stack.url, {**body, "thumb": "down"}).json()
    assert (up["revision"], down["revision"]) == (1, 2) and up["feedback_id"] != down["feedback_id"]
    events = sorted(
        (e.payload for e in consume_events(stack.kafka, FEEDBACK, lambda e: e.payload.label == "changer", count=2)),
        key=lambda p: p.revision,
    )
    assert [(e.revision, e.thumb) for e in events] == [(1, "up"), (2, "down")]
    assert events[1].supersedes == events[0].feedback_id and events[0].target == events[1].target


def test_concurrent_ratings_share_calls_yet_each_gets_its_own_verdict(stack):
    """Ratings sent at once travel to the feedback service in shared batch calls; every one is still
    judged alone: the valid ones are stored once each, a forged or malformed one is refused by name."""
    import asyncio

    _, served = chat(stack, "List some numbers.", n=8)
    marker = uuid.uuid4().hex[:8]
    forged = sign("not-the-server-key-0123456789", TokenClaims(served[0][0], "policy-0001", "x", int(time.time()) + 99))
    bodies, expected = [], []
    for k, (rid, tok) in enumerate(served):
        bodies.append(
            {"type": "thumb", "response_id": rid, "thumb": "up", "feedback_tokens": [tok], "user": f"{marker}-ok{k}"}
        )
        expected.append((200, None))
        bodies.append(
            {
                "type": "thumb",
                "response_id": rid,
                "thumb": "up",
                "feedback_tokens": [forged],
                "user": f"{marker}-forged{k}",
            }
        )
        expected.append((403, "feedback_tokens"))
        bodies.append(
            {"type": "likert", "response_id": rid, "score": 0, "feedback_tokens": [tok], "user": f"{marker}-bad{k}"}
        )
        expected.append((400, "score"))

    async def send_all():
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/feedback", json=b, headers=as_("alice")) for b in bodies))

    replies = asyncio.run(send_all())
    assert [(r.status_code, r.json().get("error", {}).get("param")) for r in replies] == expected
    accepted = {r.json()["feedback_id"] for r in replies if r.status_code == 200}
    assert len(accepted) == len(served)
    events = consume_events(
        stack.kafka, FEEDBACK, lambda e: e.payload.label.startswith(marker), count=len(served) + 1, timeout=8
    )
    assert sorted(e.payload.feedback_id for e in events) == sorted(accepted), "exactly the accepted ones, once"


def test_api_keys_guard_the_feedback_route(stack):
    before = end_offsets(stack.kafka, FEEDBACK)
    _, [(a, ta)] = chat(stack, "Once more?")
    body = {"type": "thumb", "response_id": a, "thumb": "up", "feedback_tokens": [ta], "user": "keyed"}
    for authorization in (None, b"Bearer wrong-key-0123456789abcdefgh", "Bearer ключ-0123456789abcdef".encode()):
        headers = {"Authorization": authorization} if authorization is not None else {}
        refused = rate(stack.url, body, headers=headers, principal=None)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", refused.text
    assert end_offsets(stack.kafka, FEEDBACK) == before, "a refused rating reached rlhf.feedback"
    ok = rate(stack.url, body)
    assert ok.status_code == 200, ok.text
    metrics = httpx.get(stack.url + "/metrics").text
    assert 'rlhf_gateway_requests_total{route="/v1/feedback",status="401"}' in metrics
    assert 'rlhf_gateway_requests_total{route="/v1/feedback",status="200"}' in metrics


def wrong_principal_refusals() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("rlhf_feedback_wrong_principal_total") or 0


def test_a_response_can_be_rated_only_by_the_principal_it_was_served_to(stack):
    """The old hole: one completion, then its token posted under 20 `user` values gave 20 votes. Now
    another principal's rating of it is refused (403, nothing on rlhf.feedback, a dead-letter copy),
    and its own principal has one live vote however it labels itself; a change of mind is a revision."""
    _, [(a, ta)] = chat(stack, "Who may rate this?", principal="alice")
    body = {"type": "thumb", "response_id": a, "thumb": "up", "feedback_tokens": [ta]}
    before, refusals = end_offsets(stack.kafka, FEEDBACK), wrong_principal_refusals()
    for principal in ("bob", "carol"):
        r = rate(stack.url, {**body, "user": "alice"}, principal=principal)  # claiming to be alice changes nothing
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert err["param"] == "feedback_tokens" and "issued to another principal" in err["message"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "permission_denied"
    assert end_offsets(stack.kafka, FEEDBACK) == before, "a refused rating reached rlhf.feedback"
    assert wrong_principal_refusals() == refusals + 2
    dead = consume_events(stack.kafka, FEEDBACK_DLQ, lambda e: a in e.payload.raw, count=2)
    assert len(dead) == 2 and all("another principal" in e.payload.reason for e in dead)

    replies = [rate(stack.url, {**body, "user": f"sock-puppet-{i}"}) for i in range(20)]
    assert [r.status_code for r in replies] == [200] * 20
    assert [r.json()["duplicate"] for r in replies] == [False] + [True] * 19
    assert len({r.json()["feedback_id"] for r in replies}) == 1
    changed = rate(stack.url, {**body, "thumb": "down"})
    assert changed.json()["revision"] == 2 and changed.json()["duplicate"] is False
    votes = consume_events(stack.kafka, FEEDBACK, lambda e: e.payload.responses[0].response_id == a, count=3, timeout=8)
    assert sorted((e.payload.user_id, e.payload.revision, e.payload.thumb) for e in votes) == [
        ("alice", 1, "up"),
        ("alice", 2, "down"),
    ], "one live vote per (principal, response): the first, then its revision"


def test_ratings_over_the_principals_limit_get_429_and_write_nothing(stack):
    gateway = UvicornThread(
        create_app(
            gateway_config(stack.inference.address, stack.feedback.address, feedback_rate_per_min=1, feedback_burst=2)
        )
    )
    try:
        _, served = chat(stack, "Rate us quickly.", n=3)
        bodies = [{"type": "thumb", "response_id": r, "thumb": "up", "feedback_tokens": [t]} for r, t in served]
        assert [rate(gateway.url, b).status_code for b in bodies[:2]] == [200, 200]
        before = {t: end_offsets(stack.kafka, t) for t in (FEEDBACK, FEEDBACK_DLQ)}
        refused = rate(gateway.url, bodies[2])
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 55 <= int(refused.headers["Retry-After"]) <= 60  # one rating a minute refills the bucket
        assert {t: end_offsets(stack.kafka, t) for t in (FEEDBACK, FEEDBACK_DLQ)} == before, "nothing written"
        assert rate(gateway.url, bodies[2], principal="bob").status_code == 403, "bob has his own bucket"
        metrics = httpx.get(gateway.url + "/metrics").text
        assert 'rlhf_gateway_rate_limit_total{limit="feedback",outcome="refused"}' in metrics
    finally:
        gateway.stop()


def test_refused_input_goes_to_the_dead_letter_topic_only(stack):
    before = end_offsets(stack.kafka, FEEDBACK)
    marker = uuid.uuid4().hex
    _, [(a, ta)] = chat(stack, "Hello?")
    r = rate(stack.url, {"type": "likert", "response_id": a, "score": 9, "feedback_tokens": [ta], "user": marker})
    assert r.status_code == 400 and r.json()["error"]["param"] == "score"
    r = rate(stack.url, b'{"type": "thumb", "user": "' + marker.encode() + b'", ')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    _, [(b, tb), (c, tc)] = chat(stack, "Hello again?", n=2)
    r = rate(
        stack.url,
        {"type": "ranking", "response_ids": [b, c], "ranks": [2, 1], "feedback_tokens": [tb, tc], "user": marker},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "ranks", r.text
    dead = consume_events(stack.kafka, FEEDBACK_DLQ, lambda e: marker in e.payload.raw, count=3)
    assert sorted(e.payload.param or "" for e in dead) == ["", "ranks", "score"]
    assert all(e.payload.reason for e in dead)
    assert end_offsets(stack.kafka, FEEDBACK) == before


def test_oversized_ratings_get_413_and_go_nowhere(stack):
    # The conftest gateway takes bodies up to 64 KiB; POST /v1/feedback enforces it before FastAPI.
    before = end_offsets(stack.kafka, FEEDBACK)
    _, [(a, ta)] = chat(stack, "Hello?")
    body = {
        "type": "thumb",
        "response_id": a,
        "thumb": "up",
        "feedback_tokens": [ta],
        "user": "big",
        "comment": "x" * 70_000,
    }
    declared = rate(stack.url, body)
    chunked = httpx.post(
        stack.url + "/v1/feedback",
        content=iter([json.dumps(body).encode()[:40_000]] * 2),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )  # no Content-Length
    for r in (declared, chunked):
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert end_offsets(stack.kafka, FEEDBACK) == before
    assert rate(stack.url, {**body, "comment": "fits"}).status_code == 200  # the same rating, small enough


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "type",
    "user",
    "feedback_tokens",
    "response_id",
    "response_ids",
    "thumb",
    "score",
    "preferred",
    "ranks",
    "comment",
    "tags",
    "idempotency_key",
    "extra",
]
PAYLOADS = st.one_of(
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=8).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["thumb", "likert", "pairwise", "ranking", "x"]),
            "user": st.text(max_size=200),
            "feedback_tokens": st.lists(st.text(max_size=60), max_size=3),
            "response_id": st.text(max_size=40),
            "response_ids": st.lists(st.text(max_size=10)),
            "score": st.integers(-(2**40), 2**40),
            "thumb": st.text(max_size=6),
            "ranks": st.lists(st.integers(-(2**40), 2**40), max_size=4),
            "tags": st.lists(st.text(max_size=15), max_size=8),
        }
    ).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=300),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=PAYLOADS)
def test_malformed_payloads_never_get_a_5xx_nor_reach_the_topic(stack, payload):
    before = end_offsets(stack.kafka, FEEDBACK)
    r = rate(stack.url, payload)
    assert 400 <= r.status_code < 500, (payload, r.status_code, r.text)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert end_offsets(stack.kafka, FEEDBACK) == before


def test_broker_down_gives_no_2xx_and_ratings_flow_again_after_it_returns(stack, tmp_path):
    own = start_broker()
    feedback = start_feedback(stack.loop, own.kafka)
    gateway = UvicornThread(create_app(gateway_config(stack.inference.address, feedback.address)))
    try:
        _, served = chat(stack, "Give me a number.", n=2)
        (a, ta), (b, tb) = served
        port = own.broker.port
        own.broker.stop()
        r = rate(gateway.url, {"type": "thumb", "response_id": a, "thumb": "up", "feedback_tokens": [ta], "user": "u"})
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] and "retry" in r.json()["error"]["message"]

        own.broker = EmbeddedBroker(port=port).start()  # memory storage: everything must be created again
        ensure_topics(own.kafka)
        ok = None
        for _ in range(30):  # the client retries, as the 503 told it to
            ok = rate(
                gateway.url, {"type": "thumb", "response_id": b, "thumb": "down", "feedback_tokens": [tb], "user": "u"}
            )
            if ok.status_code == 200:
                break
            time.sleep(1)
        assert ok.status_code == 200, ok.text
        events = consume_events(own.kafka, FEEDBACK, lambda e: True, count=2, timeout=10)
        assert [e.payload.responses[0].response_id for e in events] == [b], "only the acknowledged rating exists"
    finally:
        gateway.stop()
        stack.loop.run(feedback.stop())
        own.broker.stop()
