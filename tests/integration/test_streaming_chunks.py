"""Several tokens per streamed message, with the real engine, inference server and gateway: a
streamed answer reassembles to exactly the non-streamed answer of the same seed (text, token ids,
logprobs, finish_reason), over gRPC and over the gateway's SSE; it takes fewer messages than tokens;
and the first token comes no later than with coalescing off (compared in the same run)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import openai
import pytest
from prometheus_client import REGISTRY

from shared.pb import common_pb2, inference_pb2, inference_pb2_grpc
from tests.conftest import grpc_channel
from tests.integration.conftest import MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["Tell me a story about a robot.", "Explain why the sky is blue.", "List some fruits."]


@pytest.fixture(scope="module")
def stub(stack) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    channel = grpc_channel(stack.inference.address, "gateway")
    yield inference_pb2_grpc.InferenceServiceStub(channel)
    channel.close()


@contextmanager
def coalescing(stack, **fields: object) -> Iterator[None]:
    """The inference service's stream settings changed for the block (read per stream)."""
    serving = stack.inference.serving
    before = serving.cfg
    serving.cfg = dataclasses.replace(before, **fields)
    try:
        yield
    finally:
        serving.cfg = before


def request(prompt: str, seed: int, max_tokens: int = 64, logprobs: bool = True) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=prompt)],
        sampling=inference_pb2.SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, logprobs=logprobs),
    )


def reassembled(stub, msg) -> tuple[dict, int]:
    """The stream's completion put back together, and the number of messages that carried tokens."""
    text, ids, lps, tokens, finish, messages = "", [], [], [], "", 0
    for chunk in stub.GenerateStream(msg):
        if chunk.HasField("usage"):
            continue
        messages += bool(chunk.token_ids)
        text += chunk.text
        ids += chunk.token_ids
        lps += chunk.logprobs
        tokens += chunk.tokens
        finish = chunk.finish_reason or finish
    return {"text": text, "token_ids": ids, "logprobs": lps, "tokens": tokens, "finish_reason": finish}, messages


def whole(stub, msg) -> dict:
    c = stub.Generate(msg).completions[0]
    return {
        "text": c.text,
        "token_ids": list(c.token_ids),
        "logprobs": list(c.logprobs),
        "tokens": list(c.tokens),
        "finish_reason": c.finish_reason,
    }


def test_a_coalesced_stream_is_the_same_answer_in_fewer_messages(stub, stack):
    total_tokens = total_messages = 0
    # a window of several engine steps even on a busy machine: several tokens are ready per message
    with coalescing(stack, stream_coalesce_ms=100.0, stream_max_tokens_per_chunk=0):
        for seed, prompt in enumerate(PROMPTS):
            msg = request(prompt, seed)
            streamed, messages = reassembled(stub, msg)
            assert streamed == whole(stub, msg), "the stream must reassemble to the non-streamed answer"
            total_tokens += len(streamed["token_ids"])
            total_messages += messages
    assert total_tokens >= 20, "answers too short to show anything"
    assert total_messages < total_tokens / 2, f"{total_messages} messages for {total_tokens} tokens"


def test_coalescing_on_and_off_give_the_same_tokens(stub, stack):
    msg = request(PROMPTS[0], seed=11)
    with coalescing(stack, stream_coalesce_ms=0.0):
        off, messages_off = reassembled(stub, msg)
    with coalescing(stack, stream_coalesce_ms=40.0, stream_max_tokens_per_chunk=0):
        on, messages_on = reassembled(stub, msg)
    assert on == off
    assert len(off["token_ids"]) < 5 or messages_on < messages_off


def first_token_s(stub, msg) -> float:
    started = time.perf_counter()
    stream = stub.GenerateStream(msg)
    for chunk in stream:
        if chunk.token_ids:
            elapsed = time.perf_counter() - started
            stream.cancel()
            return elapsed
    raise AssertionError("the stream ended without a token")


def test_coalescing_does_not_delay_the_first_token(stub, stack):
    on: list[float] = []
    off: list[float] = []
    for i in range(6):  # interleaved: both settings see the same machine load
        msg = request(PROMPTS[i % len(PROMPTS)], seed=100 + i, max_tokens=32, logprobs=False)
        with coalescing(stack, stream_coalesce_ms=0.0):
            off.append(first_token_s(stub, msg))
        with coalescing(stack, stream_coalesce_ms=200.0, stream_max_tokens_per_chunk=0):
            on.append(first_token_s(stub, msg))
    # a held first token would add the 200 ms window; the generous factor absorbs the noise
    assert statistics.median(on) <= 2 * statistics.median(off) + 0.05, (on, off)


def sse_answer(client: openai.OpenAI, logprobs: bool, **kw) -> tuple[dict, int]:
    text, finish, toks, events = "", None, [], 0
    stream = client.chat.completions.create(model=MODEL, stream=True, logprobs=logprobs, **kw)
    for chunk in stream:
        for c in chunk.choices:
            events += 1
            text += c.delta.content or ""
            finish = c.finish_reason or finish
            if logprobs and c.logprobs and c.logprobs.content:
                toks += [(t.token, t.logprob) for t in c.logprobs.content]
    return {"text": text, "finish_reason": finish, "logprobs": toks}, events


def test_the_gateways_events_reassemble_to_the_non_streamed_answer(stack):
    client = stack.client()
    chunks = lambda: REGISTRY.get_sample_value("rlhf_gateway_stream_chunks_total") or 0.0
    tokens = lambda: REGISTRY.get_sample_value("rlhf_gateway_stream_tokens_total") or 0.0
    with coalescing(stack, stream_coalesce_ms=40.0, stream_max_tokens_per_chunk=16):
        for logprobs in (False, True):  # the per-token fast path, and the pydantic path with logprobs
            kw = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 48, "seed": 5}
            chunks_before, tokens_before = chunks(), tokens()
            streamed, events = sse_answer(client, logprobs, **kw)
            resp = client.chat.completions.create(model=MODEL, logprobs=logprobs, **kw)
            choice = resp.choices[0]
            assert streamed["text"] == choice.message.content
            assert streamed["finish_reason"] == choice.finish_reason
            if logprobs:
                assert streamed["logprobs"] == [(t.token, t.logprob) for t in choice.logprobs.content]
            n = resp.usage.completion_tokens
            assert tokens() - tokens_before == n, "the gateway counts every token it forwards"
            assert chunks() - chunks_before < n or n < 5, "several tokens per message"
            assert events <= chunks() - chunks_before + 1
