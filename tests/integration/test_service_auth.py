"""No service obeys an unauthenticated caller, on the real stack (vLLM inference, the feedback service
on the real broker, the gateway): the gateway's own credential works end to end, while a caller
without a token, with an unknown one, or with one not allowed for the RPC is refused before the
service acts, and nothing is written where it should not be. The rules and TLS are tested with real
servers in tests/unit/shared/test_grpc_server.py; the trainer's controls in test_trainer_service.py."""

from __future__ import annotations

import grpc
import pytest

from shared.grpc_channels import ClientCredentials, sync_channel
from shared.grpc_server import CALLS_REFUSED
from shared.kafka.topics import FEEDBACK
from shared.pb import common_pb2, feedback_pb2, feedback_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.conftest import consume_events, grpc_channel

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def generate(channel: grpc.Channel) -> inference_pb2.GenerateResponse:
    return inference_pb2_grpc.InferenceServiceStub(channel).Generate(
        inference_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role="user", content="Hello")],
            sampling=inference_pb2.SamplingParams(max_tokens=4),
        ),
        timeout=120,
    )


def refused(service: str, reason: str) -> float:
    return CALLS_REFUSED.labels(service, reason)._value.get()


def test_inference_generates_for_the_gateway_and_the_trainer_only(stack):
    address = stack.inference.address
    for caller in ("gateway", "trainer"):
        with grpc_channel(address, caller) as channel:
            assert generate(channel).completions, caller
    before = refused("InferenceService", "not_allowed")
    for creds, code in (
        (ClientCredentials(), grpc.StatusCode.UNAUTHENTICATED),
        (ClientCredentials(token="a-token-nobody-issued-0123456789"), grpc.StatusCode.UNAUTHENTICATED),
    ):
        with sync_channel(address, creds) as channel, pytest.raises(grpc.RpcError) as err:
            generate(channel)
        assert err.value.code() == code
    for caller in ("operator", "monitoring"):
        with grpc_channel(address, caller) as channel, pytest.raises(grpc.RpcError) as err:
            generate(channel)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, caller
    assert refused("InferenceService", "not_allowed") == before + 2
    # Reading which policy is served is allowed to operators and monitoring.
    with grpc_channel(address, "monitoring") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        assert stub.GetPolicy(inference_pb2.GetPolicyRequest(), timeout=30).policy_version


def test_only_the_gateway_may_submit_ratings_and_a_refused_one_writes_nothing(stack):
    rating = feedback_pb2.SubmitFeedbackRequest(
        thumb=feedback_pb2.ThumbRating(response_id="resp-auth-test-never-served", thumb=feedback_pb2.THUMB_UP),
        user_id="mallory",
        principal="mallory",
    )
    for creds, code in (
        (ClientCredentials(), grpc.StatusCode.UNAUTHENTICATED),
        (ClientCredentials(token="a-token-nobody-issued-0123456789"), grpc.StatusCode.UNAUTHENTICATED),
    ):
        with sync_channel(stack.feedback.address, creds) as channel, pytest.raises(grpc.RpcError) as err:
            feedback_pb2_grpc.FeedbackServiceStub(channel).SubmitFeedback(rating, timeout=30)
        assert err.value.code() == code
    for caller in ("trainer", "operator"):
        with grpc_channel(stack.feedback.address, caller) as channel, pytest.raises(grpc.RpcError) as err:
            feedback_pb2_grpc.FeedbackServiceStub(channel).SubmitFeedback(rating, timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, caller
    # The gateway's credential passes (the service then judges the rating itself: without a feedback
    # token it refuses it with its own error, which the interceptor does not count).
    before = sum(refused("FeedbackService", r) for r in ("missing_credential", "unknown_credential", "not_allowed"))
    with grpc_channel(stack.feedback.address, "gateway") as channel, pytest.raises(grpc.RpcError):
        feedback_pb2_grpc.FeedbackServiceStub(channel).SubmitFeedback(rating, timeout=30)
    after = sum(refused("FeedbackService", r) for r in ("missing_credential", "unknown_credential", "not_allowed"))
    assert after == before
    rated = rating.thumb.response_id
    written = consume_events(
        stack.kafka, FEEDBACK, lambda env: any(r.response_id == rated for r in getattr(env.payload, "responses", [])),
        1, 5,
    )  # fmt: skip
    assert written == [], "a refused rating reached rlhf.feedback"
