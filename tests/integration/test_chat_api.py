"""The chat API end to end with real parts: embedded broker, vLLM engine on the default model,
the inference gRPC server and the HTTP gateway on loopback, driven by the `openai` client."""

from __future__ import annotations

import json
import math

import grpc
import httpx
import openai
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from shared.kafka.topics import COMPLETIONS
from shared.pb import common_pb2, inference_pb2, inference_pb2_grpc
from tests.conftest import consume_events, grpc_channel, transformers_greedy
from tests.integration.conftest import MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return stack.client()


@pytest.fixture(scope="module")
def grpc_stub(stack):
    channel = grpc_channel(stack.inference.address, "gateway")
    yield inference_pb2_grpc.InferenceServiceStub(channel), health_pb2_grpc.HealthStub(channel)
    channel.close()


def published() -> float:
    return REGISTRY.get_sample_value("rlhf_kafka_events_published_total", {"topic": COMPLETIONS}) or 0.0


def test_health_reports_serving_once_loaded(grpc_stub):
    _, health = grpc_stub
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_models_lists_the_served_policy(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["policy_version"] == "policy-0001"


def test_chat_completion_carries_response_id_and_policy_version(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2 plus 3?"}], max_tokens=12, temperature=0
    )
    choice = resp.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.model_extra["policy_version"] == "policy-0001"
    assert choice.model_extra["response_id"].startswith("resp-")
    assert choice.model_extra["feedback_token"], "every served response carries a signed feedback token"
    assert resp.model_extra["response_id"] == choice.model_extra["response_id"]
    assert 0 < resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_greedy_tokens_equal_transformers_greedy(grpc_stub, stack):
    stub, _ = grpc_stub
    reply = stub.Generate(
        inference_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role="user", content="How many centimeters are in 3 meters?")],
            sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=20),
        )
    )
    completion = reply.completions[0]
    expected = transformers_greedy(stack.store.store.path("policy-0001"), list(reply.prompt_token_ids), 20)
    assert list(completion.token_ids) == expected[: len(completion.token_ids)]
    assert len(completion.token_ids) == len(expected) or completion.finish_reason == "stop"


def test_logprobs_are_the_policy_log_probabilities_of_the_sampled_tokens(client, grpc_stub, stack):
    stub, _ = grpc_stub
    reply = stub.Generate(
        inference_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role="user", content="Say thanks.")],
            sampling=inference_pb2.SamplingParams(temperature=1.0, seed=7, max_tokens=10, logprobs=True),
        )
    )
    c = reply.completions[0]
    assert len(c.logprobs) == len(c.token_ids) == len(c.tokens) > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stack.store.store.path("policy-0001"), dtype=torch.float32)
    ids = torch.tensor([list(reply.prompt_token_ids) + list(c.token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(reply.prompt_token_ids) - 1 : -1]
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(list(c.token_ids))[:, None])[:, 0]
    assert torch.allclose(torch.tensor(list(c.logprobs)), ref, atol=1e-3)

    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say thanks."}], max_tokens=5, logprobs=True
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(t.logprob <= 0 and math.isfinite(t.logprob) for t in content)


def test_streaming_gives_the_same_text_as_non_streaming(client):
    messages = [{"role": "user", "content": "What is 7 plus 5?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, versions, ids = "", None, None, set(), set()
    for chunk in stream:
        versions.add(chunk.model_extra["policy_version"])
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            ids.add(choice.model_extra["response_id"])
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert versions == {"policy-0001"} and len(ids) == 1


def test_n_completions_have_distinct_response_ids_and_are_streamed_apart(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], n=3, max_tokens=8, temperature=1.0
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.model_extra["response_id"] for c in resp.choices}) == 3
    texts: dict[int, str] = {}
    for chunk in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=8, stream=True
    ):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert sorted(texts) == [0, 1]


def test_every_completion_is_published_to_kafka(client, stack):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to three."}],
        n=2,
        max_tokens=8,
        temperature=0.7,
        user="says-it-is-bob",  # a label only: the principal is the key's
        extra_body={"conversation_id": "conv-count"},
    )
    ids = {c.model_extra["response_id"]: c for c in resp.choices}
    events = consume_events(stack.kafka, COMPLETIONS, lambda e: e.payload.response_id in ids, count=2)
    assert {e.payload.response_id for e in events} == set(ids)
    for e in events:
        p = e.payload
        assert e.producer == "inference" and e.type == "completion"
        assert p.policy_version == "policy-0001" and p.source == "user" and p.n == 2
        assert p.completion_text == ids[p.response_id].message.content
        assert p.messages[0].content == "Count to three."
        assert len(p.token_ids) > 0 and p.prompt_token_ids
        assert 0 <= p.timings.first_token_s <= p.timings.total_s
        assert (p.principal, p.conversation_id) == ("alice", "conv-count"), "who asked, as the gateway knows it"


BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "rlhf-policy", "messages": [', 400, None),
    ("body not an object", b"[1, 2]", 400, None),
    ("missing messages", {"model": MODEL}, 400, "messages"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages"),
    (
        "wrong type",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        400,
        "temperature",
    ),
    ("unknown role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("blank user message", {"model": MODEL, "messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
    (
        "too many tokens",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
        400,
        "max_tokens",
    ),
    ("n too large", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 50}, 400, "n"),
    ("negative n", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": -1}, 400, "n"),
    (
        "temperature out of range",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 7},
        400,
        "temperature",
    ),
    (
        "top_logprobs unsupported",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 3},
        400,
        "top_logprobs",
    ),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("oversized body", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70000}]}, 413, None),
]


@pytest.mark.parametrize("name, body, status, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_an_openai_error_and_publishes_nothing(stack, name, body, status, param):
    before = published()
    pending_before = stack.inference.publisher.pending
    url = stack.url + "/v1/chat/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    for stream in (False, True):
        if stream and isinstance(body, dict):
            content = json.dumps({**body, "stream": True}).encode()
        headers = {"Content-Type": "application/json", **stack.headers()}
        r = httpx.post(url, content=content, headers=headers, timeout=30)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
        assert err["param"] == param
        assert err["code"], "a stable machine-readable code, not only the message"
    assert stack.inference.publisher.flush(10)
    assert published() == before and stack.inference.publisher.pending == pending_before


def test_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100000)
    assert "max_tokens" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_grpc_bad_argument_is_invalid_argument_naming_the_field(grpc_stub):
    stub, _ = grpc_stub
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(
            inference_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role="user", content="hi")],
                sampling=inference_pb2.SamplingParams(n=99),
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "n must be between 1 and" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(inference_pb2.GenerateRequest(messages=[])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_healthz_and_metrics(stack):
    url = stack.url
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    assert "rlhf_gateway_requests_total" in text and "rlhf_inference_requests_total" in text


def test_chat_page_is_served(stack):
    r = httpx.get(stack.url + "/")
    assert r.status_code == 200 and "RLHF Flywheel" in r.text and "/v1/chat/completions" in r.text


# --- identity and limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/models", "/v1/chat/completions"])
def test_without_a_valid_key_the_api_answers_401_and_serves_nothing(stack, route):
    before = published()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for authorization in (None, b"Bearer wrong-key-0123456789abcdefgh", "Bearer ключ-0123456789abcdef".encode()):
        headers = {"Authorization": authorization} if authorization is not None else {}
        if route == "/v1/models":
            r = httpx.get(stack.url + route, headers=headers, timeout=30)
        else:
            r = httpx.post(stack.url + route, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (authorization, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key" and set(r.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.url + "/v1", api_key="wrong-key-0123456789abcdefgh", max_retries=0).models.list()
    assert stack.inference.publisher.flush(10) and published() == before


@pytest.fixture(scope="module")
def anonymous_gateway(stack):
    from services.gateway.app import create_app
    from tests.conftest import UvicornThread, gateway_config

    gateway = UvicornThread(
        create_app(gateway_config(stack.inference.address, stack.feedback.address, api_keys="", anonymous=True))
    )
    yield gateway
    gateway.stop()


def test_in_anonymous_mode_an_openai_client_keeps_its_own_principal_by_cookie(stack, anonymous_gateway):
    """No keys on this gateway: the first request opens an anonymous session (the placeholder key the
    openai client must send is ignored), the client's HTTP client keeps its cookie, so its later
    calls (its rating too) are the same principal; another client is another principal, and cannot
    rate the first one's answer."""

    def anonymous_client() -> openai.OpenAI:
        return openai.OpenAI(base_url=anonymous_gateway.url + "/v1", api_key="unused", max_retries=0)

    first, second = anonymous_client(), anonymous_client()
    resp = first.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=4)
    choice = resp.choices[0]
    rating = {
        "type": "thumb",
        "response_id": choice.model_extra["response_id"],
        "thumb": "up",
        "feedback_tokens": [choice.model_extra["feedback_token"]],
    }
    me = first.get("/session", cast_to=object)
    assert me["anonymous"] and me["principal"].startswith("anon:")
    with pytest.raises(openai.PermissionDeniedError, match="issued to another principal"):
        second.post("/feedback", body=rating, cast_to=object)
    accepted = first.post("/feedback", body=rating, cast_to=object)
    assert accepted["revision"] == 1 and accepted["duplicate"] is False
    [event] = consume_events(
        stack.kafka, COMPLETIONS, lambda e: e.payload.response_id == rating["response_id"], count=1
    )
    assert event.payload.principal == me["principal"]


def test_chat_completions_over_the_principals_limit_get_429_with_retry_after(stack):
    from services.gateway.app import create_app
    from tests.conftest import UvicornThread, gateway_config

    gateway = UvicornThread(create_app(gateway_config(stack.inference.address, chat_rate_per_min=1, chat_burst=2)))
    try:
        before = published()
        alice, bob = (
            openai.OpenAI(base_url=gateway.url + "/v1", api_key=stack.client(p).api_key, max_retries=0)
            for p in ("alice", "bob")
        )
        ask = {"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 2}
        for _ in range(2):
            alice.chat.completions.create(**ask)
        with pytest.raises(openai.RateLimitError) as err:
            alice.chat.completions.create(**ask)
        assert 1 <= int(err.value.response.headers["Retry-After"]) <= 60
        assert err.value.response.json()["error"]["code"] == "rate_limit_exceeded"
        assert bob.chat.completions.create(**ask).choices, "the limit is per principal"
        assert stack.inference.publisher.flush(10)
        assert published() == before + 3, "the refused request generated nothing"
    finally:
        gateway.stop()
