"""What the gateway sends on and signs for a chat completion: the authenticated principal and the
conversation go to the inference service and into every response's feedback token. Routing between
a stable and a canary group of inference replicas (scripted servers on real loopback gRPC): the
share goes to the canary, side by side answers come one from each version, a canary group that is
down hands its requests to the stable one, and streams are merged."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.gateway.chat.schema import ChatCompletionRequest
from services.gateway.chat.serving import (
    INFERENCE_HEALTH_SERVICE,
    ChatServing,
    FeedbackTokens,
    InferenceClient,
    to_generate_request,
)
from services.gateway.rollout.routing import Router
from shared.config import FeedbackTokenConfig
from shared.events import RolloutEvent
from shared.feedback_token import verify
from shared.grpc_channels import ClientCredentials
from shared.pb import common_pb2, inference_pb2, inference_pb2_grpc

SECRET = "s" * 32


def request(**over) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **over)


def test_the_generate_request_carries_the_principal_and_conversation_not_the_user_label():
    msg = to_generate_request(request(user="mallory", conversation_id="conv-1"), "alice")
    assert (msg.principal, msg.conversation_id, msg.source) == ("alice", "conv-1", "user")
    assert to_generate_request(request(), "alice").conversation_id == ""


def test_each_feedback_token_is_issued_to_the_principal_served():
    signer = FeedbackTokens(FeedbackTokenConfig(secret=SECRET)).for_request(request(conversation_id="c1"), "alice")
    token = signer("resp-1", "policy-0001")
    assert token is not None
    claims = verify(SECRET, token)
    assert (claims.response_id, claims.principal, claims.conversation_id) == ("resp-1", "alice", "c1")
    assert claims.expires_at > time.time()
    assert FeedbackTokens(FeedbackTokenConfig()).for_request(request(), "alice")("r", "p") is None  # feedback off


# --- routing between a stable and a canary group (real gRPC on loopback, scripted inference) -------

STABLE_V, CANARY_V = "policy-0007", "policy-0008"


class ScriptedInference(inference_pb2_grpc.InferenceServiceServicer):
    """An inference group that answers every completion with its version's name (no model)."""

    def __init__(self, version: str):
        self.version = version
        self.requests: list[inference_pb2.GenerateRequest] = []

    def _completion(self, i: int) -> inference_pb2.Completion:
        return inference_pb2.Completion(
            response_id=f"resp-{uuid.uuid4().hex}", index=i, text=f"from {self.version}", finish_reason="stop"
        )

    async def Generate(self, request, context):
        self.requests.append(request)
        n = request.sampling.n or 1
        return inference_pb2.GenerateResponse(
            request_id=f"req-{uuid.uuid4().hex}",
            policy_version=self.version,
            model="m",
            completions=[self._completion(i) for i in range(n)],
            usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=2 * n, total_tokens=5 + 2 * n),
        )

    async def GenerateStream(self, request, context):
        self.requests.append(request)
        rid = f"req-{uuid.uuid4().hex}"
        n = request.sampling.n or 1
        for i in range(n):
            resp = f"resp-{uuid.uuid4().hex}"
            for j, word in enumerate(("from ", self.version)):
                yield inference_pb2.GenerateChunk(
                    request_id=rid, policy_version=self.version, model="m", index=i, response_id=resp,
                    text=word, finish_reason="stop" if j == 1 else "",
                )  # fmt: skip
                await asyncio.sleep(0)
        yield inference_pb2.GenerateChunk(
            request_id=rid, policy_version=self.version, model="m",
            usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=2 * n, total_tokens=5 + 2 * n),
        )  # fmt: skip

    async def GetPolicy(self, request, context):
        return inference_pb2.PolicyInfo(policy_version=self.version, model="m")


async def serve(servicer: ScriptedInference) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    h = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await h.set(INFERENCE_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return server, f"127.0.0.1:{port}"


def rollout(share: float, canary: str = CANARY_V) -> RolloutEvent:
    return RolloutEvent(
        sequence=1, version=canary, stage="canary", reason="t", stable=STABLE_V, canary=canary,
        canary_share=share, paused=False, mode="auto",
    )  # fmt: skip


def run_with_groups(share: float, body, *, canary_up: bool = True, side_by_side: bool = True):
    """Run ``body(chat, stable, canary)`` against a stable and a canary group (the canary group's
    address unbound when ``canary_up`` is false), with a canary at ``share``."""

    async def main():
        stable, canary = ScriptedInference(STABLE_V), ScriptedInference(CANARY_V)
        s_server, s_addr = await serve(stable)
        c_server, c_addr = await serve(canary)
        if not canary_up:
            await c_server.stop(None)
        router = Router(canary_enabled=True)
        router.apply(rollout(share))
        chat = ChatServing(FeedbackTokens(FeedbackTokenConfig(secret=SECRET)), router, side_by_side=side_by_side)
        clients = [InferenceClient(a, 10, ClientCredentials()) for a in (s_addr, c_addr)]
        chat.attach(*clients)
        try:
            return await body(chat, stable, canary)
        finally:
            for c in clients:
                await c.close()
            await s_server.stop(None)
            if canary_up:
                await c_server.stop(None)

    return asyncio.run(main())


def test_a_request_in_the_canary_share_is_served_by_the_canary_group_and_signed_for_its_version():
    async def body(chat, stable, canary):
        reply = await chat.complete(request(), "alice")
        return reply, len(stable.requests), len(canary.requests), dict(chat.router.routed)

    reply, to_stable, to_canary, routed = run_with_groups(1.0, body)
    assert reply.policy_version == CANARY_V and reply.choices[0].policy_version == CANARY_V
    assert verify(SECRET, reply.choices[0].feedback_token).policy_version == CANARY_V
    assert (to_stable, to_canary) == (0, 1) and routed["canary"] == 1


def test_outside_the_share_every_request_goes_to_the_stable_group():
    async def body(chat, stable, canary):
        replies = [await chat.complete(request(conversation_id=f"c{i}"), f"user-{i}") for i in range(20)]
        return replies, len(canary.requests)

    replies, to_canary = run_with_groups(0.0, body)
    assert {r.policy_version for r in replies} == {STABLE_V} and to_canary == 0


def test_a_side_by_side_request_gets_one_answer_from_each_version():
    async def body(chat, stable, canary):
        return [await chat.complete(request(n=2), "alice") for _ in range(12)], stable.requests, canary.requests

    replies, to_stable, to_canary = run_with_groups(1.0, body)
    orders = set()
    for reply in replies:
        versions = [c.policy_version for c in reply.choices]
        assert sorted(versions) == [STABLE_V, CANARY_V] and [c.index for c in reply.choices] == [0, 1]
        assert len({c.response_id for c in reply.choices}) == 2
        for c in reply.choices:
            claims = verify(SECRET, c.feedback_token)
            assert (claims.response_id, claims.policy_version, claims.principal) == (
                c.response_id,
                c.policy_version,
                "alice",
            )
        assert reply.usage.completion_tokens == 4 and reply.usage.prompt_tokens == 5
        orders.add(tuple(versions))
    assert len(orders) == 2, "the canary's answer is shown first or second at random"
    assert all(r.sampling.n == 1 for r in to_stable + to_canary) and len(to_stable) == len(to_canary) == 12


def test_side_by_side_off_or_outside_the_canary_keeps_both_answers_from_one_version():
    async def body(chat, stable, canary):
        return await chat.complete(request(n=2), "alice")

    off = run_with_groups(1.0, body, side_by_side=False)
    assert [c.policy_version for c in off.choices] == [CANARY_V, CANARY_V]
    outside = run_with_groups(0.0, body)
    assert [c.policy_version for c in outside.choices] == [STABLE_V, STABLE_V]


def test_a_canary_group_that_is_down_hands_its_requests_to_the_stable_group():
    async def body(chat, stable, canary):
        one = await chat.complete(request(), "alice")
        pair = await chat.complete(request(n=2), "alice")
        events = await chat.stream(request(stream=True), "alice")
        streamed = [e async for e in events]
        return one, pair, streamed, dict(chat.router.routed)

    one, pair, streamed, routed = run_with_groups(1.0, body, canary_up=False)
    assert one.policy_version == STABLE_V
    assert [c.policy_version for c in pair.choices] == [STABLE_V, STABLE_V]
    assert all(json.loads(e[6:])["policy_version"] == STABLE_V for e in streamed[:-1])
    assert routed["canary_fallback"] == 3


def test_a_streamed_side_by_side_request_merges_the_two_streams():
    async def body(chat, stable, canary):
        events = await chat.stream(request(n=2, stream=True, stream_options={"include_usage": True}), "alice")
        return [e async for e in events]

    events = run_with_groups(1.0, body)
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    *choice_chunks, usage = chunks
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    by_index: dict[int, list[dict]] = {}
    for chunk in choice_chunks:
        (choice,) = chunk["choices"]
        by_index.setdefault(choice["index"], []).append({**choice, "chunk_version": chunk["policy_version"]})
    assert sorted(by_index) == [0, 1]
    versions = set()
    for parts in by_index.values():
        first = parts[0]
        assert first["delta"]["role"] == "assistant" and "feedback_token" in first
        claims = verify(SECRET, first["feedback_token"])
        assert claims.policy_version == first["policy_version"] == first["chunk_version"]
        assert "".join(p["delta"]["content"] for p in parts) == f"from {first['policy_version']}"
        assert parts[-1]["finish_reason"] == "stop"
        versions.add(first["policy_version"])
    assert versions == {STABLE_V, CANARY_V}


@pytest.mark.parametrize("share,group", [(1.0, CANARY_V), (0.0, STABLE_V)])
def test_a_streamed_request_is_routed_like_a_plain_one(share, group):
    async def body(chat, stable, canary):
        events = await chat.stream(request(stream=True), "alice")
        return [e async for e in events]

    events = run_with_groups(share, body)
    assert {json.loads(e[6:])["policy_version"] for e in events[:-1]} == {group}
