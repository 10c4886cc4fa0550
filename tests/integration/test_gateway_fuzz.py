"""Fuzzing the gateway and the gRPC servicers behind it, with the real stack (vLLM engine, inference
and feedback services, the embedded broker):

- schemathesis generates requests from the gateway's own OpenAPI schema, for every operation, both
  valid ones and ones that break the schema (some with the served model's name and a small
  max_tokens, so that real completions are generated too), with and without a valid key;
- hypothesis generates protobuf requests for the feedback service (SubmitFeedback and
  SubmitFeedbackBatch, some with validly signed tokens) and the inference service (Generate, with
  integers across their wire types, NaN and infinite floats).

Properties: no HTTP 5xx and no gRPC INTERNAL/UNKNOWN answer; nothing written for refused input
(rlhf.feedback grows by exactly the ratings accepted as new, rlhf.completions by exactly the
completions served). The suite runs a sample of a few hundred cases; tests/benchmarks/bench_fuzz.py
runs the same drivers for 10,000 and more.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from shared.feedback_token import TokenClaims, sign
from shared.kafka.topics import COMPLETIONS, FEEDBACK
from shared.pb import common_pb2, feedback_pb2, feedback_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.conftest import TEST_API_KEYS, TEST_TOKEN_SECRET, consume_events, grpc_channel
from tests.integration.conftest import MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
BAD_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})
"""gRPC answers that mean the service crashed on the input rather than refusing it."""


@dataclasses.dataclass
class Tally:
    """What one fuzzing run sent and got back."""

    requests: int = 0
    statuses: Counter = dataclasses.field(default_factory=Counter)
    failures: list[str] = dataclasses.field(default_factory=list)
    """A description of each 5xx / crash-like answer (empty is the pass)."""
    served: set[str] = dataclasses.field(default_factory=set)
    """Response ids of the completions served (each one must be on rlhf.completions)."""
    accepted: int = 0
    """Ratings accepted as new records (not duplicates)."""

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0]))},
            "failures": self.failures[:20],
            "failure_count": len(self.failures),
            "completions_served": len(self.served),
            "ratings_accepted": self.accepted,
        }


def end_offset(kafka, topic: str) -> int:
    """Records on ``topic`` so far (the sum of its partitions' end offsets)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=kafka.servers)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        return sum(consumer.end_offsets(parts).values())
    finally:
        consumer.close()


def settled_offset(kafka, topic: str, quiet_s: float = 1.0, timeout_s: float = 30.0) -> int:
    """The end offset of ``topic`` once it has not moved for ``quiet_s`` (late publishes landed)."""
    last, since, deadline = end_offset(kafka, topic), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.2)
        now = end_offset(kafka, topic)
        if now != last:
            last, since = now, time.monotonic()
    return last


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


# --- HTTP: schemathesis over the gateway's OpenAPI schema ----------------------------------------


def response_ids(path: str, status: int, text: str) -> set[str]:
    """The response ids of the completions a 2xx generation answer served (JSON or a stream)."""
    if status >= 300 or path not in GENERATION_PATHS:
        return set()
    if text.startswith("data:") or "\ndata:" in text:
        ids = set()
        for line in text.splitlines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    if choice.get("response_id"):
                        ids.add(choice["response_id"])
        return ids
    return {c["response_id"] for c in json.loads(text).get("choices", [])}


def fuzz_http(url: str, openapi: dict, examples_per_operation: int, run_seed: int = 0) -> Tally:
    """Generated requests for every operation of ``openapi``, sent to the gateway at ``url``."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(openapi)
    tally = Tally()
    keys = [f"Bearer {TEST_API_KEYS['alice']}", f"Bearer {TEST_API_KEYS['bob']}", "Bearer wrong-key", None]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for result in schema.get_all_operations():
            operation = result.ok()

            @seed(run_seed)
            @_settings(examples_per_operation)
            @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
            def one(case, data) -> None:
                headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
                key = data.draw(st.sampled_from(keys))
                if key is not None:
                    headers["Authorization"] = key
                if isinstance(case.body, dict) and case.path in GENERATION_PATHS and data.draw(st.booleans()):
                    case.body["model"] = MODEL  # a real generation, kept short
                    case.body["max_tokens"] = data.draw(st.integers(1, 4))
                    case.body.pop("max_completion_tokens", None)
                try:
                    response = case.call(base_url=url, headers=headers, timeout=120)
                except Exception as exc:  # noqa: BLE001 - a reset connection is a failure to report
                    tally.failures.append(f"{case.method} {case.formatted_path}: {type(exc).__name__}: {exc}")
                    return
                tally.requests += 1
                tally.statuses[response.status_code] += 1
                if response.status_code >= 500:
                    tally.failures.append(
                        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
                        f" (body {str(case.body)[:300]})"
                    )
                if '"error"' in response.text and response.text.startswith("data:") and '"status": 5' in response.text:
                    tally.failures.append(
                        f"{case.method} {case.formatted_path} -> 5xx in the stream: {response.text[-300:]}"
                    )
                tally.served |= response_ids(case.path, response.status_code, response.text)

            try:
                one()
            except Unsatisfiable:
                pass  # nothing to break in this operation's schema (no parameters, no body)
    return tally


# --- gRPC: hypothesis on the feedback and inference servicers --------------------------------------

TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
UINT32 = st.one_of(st.integers(0, 10), st.integers(0, 2**32 - 1))
UINT64 = st.one_of(st.integers(0, 10), st.integers(0, 2**64 - 1))


@st.composite
def feedback_requests(draw) -> feedback_pb2.SubmitFeedbackRequest:
    """A rating of any kind with any values; sometimes with validly signed tokens for its principal."""
    principal = draw(st.one_of(st.sampled_from(["alice", "bob", "anon:0123abcd"]), TEXT))
    ids = draw(st.lists(st.one_of(st.from_regex(r"resp-fuzz-[0-9a-f]{6}", fullmatch=True), TEXT), max_size=10))
    msg = feedback_pb2.SubmitFeedbackRequest(
        principal=principal,
        user_id=draw(TEXT),
        comment=draw(st.one_of(TEXT, st.text(min_size=1990, max_size=2100))),
        tags=draw(st.lists(st.one_of(st.sampled_from(["harmful", "unhelpful", "hallucination"]), TEXT), max_size=8)),
        idempotency_key=draw(st.one_of(st.just(""), TEXT)),
    )
    kind = draw(st.sampled_from(["thumb", "likert", "pairwise", "ranking", "none"]))
    first = ids[0] if ids else ""
    if kind == "thumb":
        msg.thumb.CopyFrom(feedback_pb2.ThumbRating(response_id=first, thumb=draw(st.integers(0, 5))))
    elif kind == "likert":
        msg.likert.CopyFrom(feedback_pb2.LikertRating(response_id=first, score=draw(UINT32)))
    elif kind == "pairwise":
        a, b = (ids + ["", ""])[:2]
        preferred = draw(st.one_of(st.sampled_from(["a", "b", "tie"]), TEXT))
        msg.pairwise.CopyFrom(feedback_pb2.PairwiseChoice(response_id_a=a, response_id_b=b, preferred=preferred))
    elif kind == "ranking":
        msg.ranking.CopyFrom(feedback_pb2.Ranking(response_ids=ids, ranks=draw(st.lists(UINT32, max_size=10))))
    if draw(st.booleans()):  # tokens signed with the real secret, for these ids and this principal
        expires = int(time.time()) + draw(st.sampled_from([3600, -10]))
        msg.feedback_tokens.extend(
            sign(TEST_TOKEN_SECRET, TokenClaims(rid, "policy-0001", "0" * 32, expires, principal)) for rid in ids
        )
    else:
        msg.feedback_tokens.extend(draw(st.lists(TEXT, max_size=10)))
    return msg


def fuzz_feedback(address: str, examples: int, run_seed: int = 0) -> Tally:
    """SubmitFeedback and SubmitFeedbackBatch calls as the gateway (the only caller allowed)."""
    channel = grpc_channel(address, "gateway")
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
    tally = Tally()

    def judge(item: str, code: grpc.StatusCode | None, accepted: feedback_pb2.SubmitFeedbackResponse | None) -> None:
        tally.requests += 1
        tally.statuses[code.name if code else "OK"] += 1
        if code in BAD_CODES:
            tally.failures.append(item)
        if accepted is not None and not accepted.duplicate:
            tally.accepted += 1

    @seed(run_seed)
    @_settings(examples)
    @given(batch=st.lists(feedback_requests(), min_size=1, max_size=4), single=st.booleans())
    def one(batch, single) -> None:
        if single:
            try:
                reply = stub.SubmitFeedback(batch[0], timeout=30)
            except grpc.RpcError as exc:
                judge(f"SubmitFeedback {exc.code().name}: {exc.details()}", exc.code(), None)
            else:
                judge("SubmitFeedback", None, reply)
            return
        try:
            replies = stub.SubmitFeedbackBatch(feedback_pb2.SubmitFeedbackBatchRequest(submissions=batch), timeout=30)
        except grpc.RpcError as exc:
            judge(f"SubmitFeedbackBatch {exc.code().name}: {exc.details()}", exc.code(), None)
            return
        for result in replies.results:
            if result.HasField("error"):
                code = next((c for c in grpc.StatusCode if c.value[0] == result.error.code), grpc.StatusCode.UNKNOWN)
                judge(f"batch item {code.name}: {result.error.message}", code, None)
            else:
                judge("batch item", None, result.accepted)

    try:
        one()
    finally:
        channel.close()
    return tally


@st.composite
def generate_requests(draw) -> inference_pb2.GenerateRequest:
    """A generation request with any roles, sizes and sampling values (few of them generate: they
    are kept to at most 4 tokens when they would)."""
    messages = draw(
        st.lists(
            st.builds(
                common_pb2.ChatMessage,
                role=st.one_of(st.sampled_from(["system", "user", "assistant"]), TEXT),
                content=st.one_of(TEXT, st.just("Say hi"), st.text(min_size=3000, max_size=5000)),
            ),
            max_size=5,
        )
    )
    sampling = inference_pb2.SamplingParams(
        n=draw(st.one_of(st.integers(0, 2), UINT32)),
        logprobs=draw(st.booleans()),
        stop=draw(st.lists(TEXT, max_size=6)),
    )
    floats = st.one_of(st.floats(0, 2), st.floats(allow_nan=True, allow_infinity=True, width=32))
    for name, strategy in (
        ("temperature", floats),
        ("top_p", floats),
        ("top_k", UINT32),
        ("max_tokens", st.one_of(st.integers(0, 4), st.integers(2**31, 2**32 - 1))),
        ("seed", UINT64),
    ):
        if draw(st.booleans()):
            setattr(sampling, name, draw(strategy))
    if not sampling.HasField("max_tokens"):
        sampling.max_tokens = 2
    source = draw(st.one_of(st.sampled_from(["user", "trainer", ""]), TEXT))
    if draw(st.integers(0, 3)) == 0:  # a quarter: a request that can be served, with the values above in range
        source = draw(st.sampled_from(["user", "trainer"]))
        messages = [common_pb2.ChatMessage(role="user", content="Say hi")]
        sampling.n = draw(st.integers(1, 2))
        sampling.max_tokens = draw(st.integers(1, 4))
        for name in ("temperature", "top_p"):
            if sampling.HasField(name) and not 0 < getattr(sampling, name) <= 1:
                sampling.ClearField(name)
        del sampling.stop[:]
    return inference_pb2.GenerateRequest(
        messages=messages,
        sampling=sampling,
        source=source,
        principal=draw(TEXT),
        conversation_id=draw(TEXT),
    )


def fuzz_inference(address: str, examples: int, run_seed: int = 0) -> Tally:
    """Generate calls as the gateway."""
    channel = grpc_channel(address, "gateway")
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    tally = Tally()

    @seed(run_seed)
    @_settings(examples)
    @given(request=generate_requests())
    def one(request) -> None:
        tally.requests += 1
        try:
            reply = stub.Generate(request, timeout=120)
        except grpc.RpcError as exc:
            tally.statuses[exc.code().name] += 1
            if exc.code() in BAD_CODES:
                tally.failures.append(f"Generate {exc.code().name}: {exc.details()} ({str(request)[:300]})")
            return
        tally.statuses["OK"] += 1
        tally.served |= {c.response_id for c in reply.completions}

    try:
        one()
    finally:
        channel.close()
    return tally


# --- the suite's sample --------------------------------------------------------------------------


def test_fuzzed_http_requests_get_no_5xx_and_write_nothing_they_were_refused(stack):
    openapi = httpx.get(
        stack.url + "/openapi.json", headers={"Authorization": f"Bearer {TEST_API_KEYS['alice']}"}
    ).json()
    feedback_before = settled_offset(stack.kafka, FEEDBACK)
    completions_before = settled_offset(stack.kafka, COMPLETIONS)
    tally = fuzz_http(stack.url, openapi, examples_per_operation=30)
    assert not tally.failures, "\n".join(tally.failures[:10])
    assert tally.requests >= 250, tally.as_dict()
    assert sum(n for status, n in tally.statuses.items() if 400 <= status < 500) > 0
    assert settled_offset(stack.kafka, COMPLETIONS) - completions_before == len(tally.served)
    assert settled_offset(stack.kafka, FEEDBACK) == feedback_before, "no fuzzed rating carries a valid token"


def test_fuzzed_feedback_calls_never_crash_and_only_accepted_ratings_are_written(stack):
    before = settled_offset(stack.kafka, FEEDBACK)
    tally = fuzz_feedback(stack.feedback.address, examples=150)
    assert not tally.failures, "\n".join(tally.failures[:10])
    assert tally.statuses["INVALID_ARGUMENT"] > 0 and tally.statuses["OK"] > 0, tally.as_dict()  # both sides reached
    assert settled_offset(stack.kafka, FEEDBACK) - before == tally.accepted


def written_response_ids(kafka, records: int) -> set[str]:
    """The response ids of the first ``records`` completion events on rlhf.completions."""
    from shared.events import CompletionEvent

    envs = consume_events(kafka, COMPLETIONS, lambda env: True, records)
    return {env.payload.response_id for env in envs if isinstance(env.payload, CompletionEvent)}


def test_fuzzed_generate_calls_never_crash_and_only_served_completions_are_written(stack):
    before = settled_offset(stack.kafka, COMPLETIONS)
    earlier = written_response_ids(stack.kafka, before)
    tally = fuzz_inference(stack.inference.address, examples=60)
    assert not tally.failures, "\n".join(tally.failures[:10])
    assert tally.statuses["INVALID_ARGUMENT"] > 0 and tally.statuses["OK"] > 0, tally.as_dict()
    after = settled_offset(stack.kafka, COMPLETIONS)
    # Delivery is at least once (the outbox re-sends a batch's records after a failure), so the
    # check is on distinct completions: exactly the served ones were written, nothing refused.
    assert written_response_ids(stack.kafka, after) - earlier == tally.served
    assert after - before >= len(tally.served)
