"""The gateway's edges over real HTTP, with the real stack behind it (vLLM engine, inference and
feedback services, the embedded broker): odd bytes and huge integers get 4xx naming the problem,
never a 500; upstream failures reach the client as a generic message with a request id, not the
upstream's text; the legacy completions API, GET /v1/models/{id} and the bounds on the request
head, the body's arrival and the feedback queue."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid

import grpc
import httpx
import openai
import pytest
import uvicorn
from prometheus_client import REGISTRY

from services.gateway.app import create_app
from services.gateway.uvicorn_single_write import guarded_protocol
from shared.kafka.topics import COMPLETIONS, FEEDBACK
from shared.pb import feedback_pb2_grpc
from tests.conftest import TEST_API_KEYS, consume_events, free_port, gateway_config, wait_until
from tests.integration.conftest import MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALICE = {"Authorization": f"Bearer {TEST_API_KEYS['alice']}"}
HI = [{"role": "user", "content": "Say hi"}]


class GuardedServer:
    """The gateway's ASGI app on uvicorn as `python -m services.gateway` runs it: the guarded
    protocol with the config's head bounds, its concurrency limit and keep-alive."""

    def __init__(self, cfg) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(cfg),
                host="127.0.0.1",
                port=self.port,
                log_config=None,
                access_log=False,
                lifespan="on",
                http=guarded_protocol(cfg.header_timeout_s, cfg.max_header_bytes),
                limit_concurrency=cfg.max_concurrency,
                timeout_keep_alive=cfg.keep_alive_s,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send one request as raw bytes and read the answer until the server closes or 5 s pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + body)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1].endswith(b"}"):
                    break
        except TimeoutError:
            pass
        return data


def end_offset(kafka, topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=kafka.servers)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        return sum(consumer.end_offsets(parts).values())
    finally:
        consumer.close()


# --- odd input: 4xx, never 500 ---------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/feedback", "/v1/completions", "/v1/models"])
@pytest.mark.parametrize("key", [b"Bearer \xff\xfe\xfd", "Bearer ключ-ключ-ключ-ключ".encode(), b"\xc3\x28"])
def test_a_non_ascii_authorization_header_gets_401_on_every_route(stack, route, key):
    method = b"GET" if route == "/v1/models" else b"POST"
    body = b'{"model": "m"}'
    head = (
        method
        + b" "
        + route.encode()
        + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: "
        + key
        + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    answer = raw_request(stack.gateway.port, head, body)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b'"invalid_api_key"' in answer


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", 2**32), ("n", 2**32), ("top_k", 2**32), ("max_completion_tokens", 2**40), ("seed", 2**64)],
)
def test_integers_beyond_the_wire_types_get_400_naming_the_field(stack, field, value):
    r = httpx.post(
        stack.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, field: value}, headers=ALICE
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and "must be an integer from 0 to" in r.json()["error"]["message"]
    r = httpx.post(
        stack.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2**32}, headers=ALICE
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_a_feedback_integer_beyond_its_wire_type_gets_400_and_writes_nothing(stack):
    before = end_offset(stack.kafka, FEEDBACK)
    for body in (
        {"type": "likert", "response_id": "r", "score": 2**32, "feedback_tokens": ["t"]},
        {"type": "ranking", "response_ids": ["a", "b"], "ranks": [1, 2**64], "feedback_tokens": ["t", "u"]},
    ):
        r = httpx.post(stack.url + "/v1/feedback", json=body, headers=ALICE)
        assert r.status_code == 400, r.text
    assert end_offset(stack.kafka, FEEDBACK) == before


def test_top_logprobs_gets_a_clear_400(stack):
    with pytest.raises(openai.BadRequestError) as refused:
        stack.client().chat.completions.create(model=MODEL, messages=HI, logprobs=True, top_logprobs=3, max_tokens=2)
    assert refused.value.body["param"] == "top_logprobs"
    assert "sampled token's logprob only" in refused.value.body["message"]


# --- the OpenAI probes: GET /v1/models/{id}, POST /v1/completions ----------------------------------


def test_a_model_is_retrieved_by_id_and_an_unknown_one_is_404(stack):
    model = stack.client().models.retrieve(MODEL)
    assert model.id == MODEL and model.model_extra["policy_version"].startswith("policy-")
    with pytest.raises(openai.NotFoundError):
        stack.client().models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError):
        stack.client().models.retrieve("rlhf-pоlicy")  # a Cyrillic o: names match byte for byte


def test_the_legacy_completions_api_answers_a_prompt_that_can_be_rated(stack):
    before = end_offset(stack.kafka, FEEDBACK)
    resp = stack.client().completions.create(
        model=MODEL, prompt="What is 2 plus 2?", max_tokens=6, temperature=0, logprobs=0
    )
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    choice = resp.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == resp.usage.completion_tokens
    response_id = choice.model_extra["response_id"]
    assert choice.model_extra["policy_version"].startswith("policy-")
    events = consume_events(stack.kafka, COMPLETIONS, lambda e: e.payload.response_id == response_id, count=1)
    assert events and events[0].payload.messages[-1].content == "What is 2 plus 2?"
    rated = httpx.post(
        stack.url + "/v1/feedback",
        json={
            "type": "thumb",
            "response_id": response_id,
            "thumb": "up",
            "feedback_tokens": [choice.model_extra["feedback_token"]],
        },
        headers=ALICE,
    )
    assert rated.status_code == 200, rated.text
    assert end_offset(stack.kafka, FEEDBACK) == before + 1
    with pytest.raises(openai.BadRequestError) as refused:
        stack.client().completions.create(model=MODEL, prompt="hi", echo=True)
    assert refused.value.body["param"] == "echo"


# --- upstream failures: no internal text in HTTP bodies ---------------------------------------------


def test_an_unreachable_upstream_answers_a_generic_message_with_a_request_id():
    dead = f"127.0.0.1:{free_port()}"
    server = GuardedServer(gateway_config(dead, dead))
    try:
        r = httpx.get(server.url + "/v1/models", headers=ALICE, timeout=30)
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "request id req-" in message
        assert dead not in r.text and "connect" not in r.text.lower() and "ipv4" not in r.text
        chat = httpx.post(
            server.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI}, headers=ALICE, timeout=30
        )
        assert chat.status_code == 503 and dead not in chat.text
    finally:
        server.stop()


# --- bounds: the request head, the body's arrival, the feedback queue --------------------------------


def test_a_slow_body_gets_408_and_a_slow_head_is_cut_off(stack):
    cfg = gateway_config(stack.inference.address, body_timeout_s=0.5, header_timeout_s=0.5)
    server = GuardedServer(cfg)
    try:
        started = time.monotonic()
        answer = raw_request(
            server.port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: " + ALICE["Authorization"].encode() + b"\r\nContent-Length: 100\r\n\r\n",
            b'{"model": ',
        )
        assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
        assert time.monotonic() - started < 4
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
            assert sock.recv(65536) == b"", "closed without an answer"
    finally:
        server.stop()


def test_a_huge_header_gets_431_and_a_huge_body_413(stack):
    server = GuardedServer(gateway_config(stack.inference.address, max_header_bytes=4096))
    try:
        answer = raw_request(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 8192 + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431")
        answer = raw_request(
            server.port,
            b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: "
            + ALICE["Authorization"].encode()
            + f"\r\nContent-Length: {2 << 20}\r\n\r\n".encode(),
            b"{" + b" " * 1000,
        )
        assert answer.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in answer
    finally:
        server.stop()


class StalledFeedback(feedback_pb2_grpc.FeedbackServiceServicer):
    """A feedback service that holds every call until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def SubmitFeedbackBatch(self, request, context):
        self.calls += 1
        await self.release.wait()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "stalled service at 10.9.8.7 released")


def test_a_full_feedback_queue_answers_429_in_the_openai_shape(stack):
    service = StalledFeedback()
    loop = stack.loop

    async def serve():
        server = grpc.aio.server()
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def depth() -> float:
        return REGISTRY.get_sample_value("rlhf_gateway_feedback_queue_depth") or 0

    grpc_server, port = loop.run(serve())
    server = GuardedServer(gateway_config(stack.inference.address, f"127.0.0.1:{port}", feedback_queue_max=2))
    refused_before = REGISTRY.get_sample_value("rlhf_gateway_feedback_queue_refused_total") or 0
    rating = {"type": "thumb", "response_id": "r", "thumb": "up", "feedback_tokens": ["t"]}

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, headers=ALICE, timeout=30) as client:
            held = []
            for i in range(4):  # one call per rating, until the batcher's 4 call slots are busy
                held.append(asyncio.ensure_future(client.post("/v1/feedback", json=rating)))
                await asyncio.to_thread(wait_until, lambda n=i + 1: service.calls == n, 10, "call not made")
            held += [asyncio.ensure_future(client.post("/v1/feedback", json=rating)) for _ in range(2)]
            await asyncio.to_thread(wait_until, lambda: depth() == 2, 10, "ratings not queued")
            refused = [await client.post("/v1/feedback", json=rating) for _ in range(3)]
            loop.loop.call_soon_threadsafe(service.release.set)
            return refused, list(await asyncio.gather(*held))

    try:
        refused, held = asyncio.run(scenario())
    finally:
        server.stop()
        loop.run(grpc_server.stop(0))
    assert [r.status_code for r in refused] == [429] * 3
    body = refused[0].json()["error"]
    assert body["type"] == "rate_limit_exceeded" and "queue" in body["message"] and refused[0].headers["Retry-After"]
    assert (REGISTRY.get_sample_value("rlhf_gateway_feedback_queue_refused_total") or 0) == refused_before + 3
    assert [r.status_code for r in held] == [503] * 6, "the queued ratings were served (here: refused upstream)"
    assert all("10.9.8.7" not in r.text and "request id req-" in r.text for r in held)


# --- the request metric stays bounded ----------------------------------------------------------------


def test_300_random_paths_over_http_add_no_series(stack):
    def series() -> int:
        text = httpx.get(stack.url + "/metrics").text
        return sum(1 for line in text.splitlines() if line.startswith("rlhf_gateway_request"))

    httpx.get(stack.url + f"/v1/{uuid.uuid4()}", headers=ALICE)
    httpx.get(stack.url + f"/v1/{uuid.uuid4()}")
    series()  # /metrics' own series appear from its second scrape on
    before = series()
    with httpx.Client(base_url=stack.url) as client:
        for i in range(300):
            client.get(f"/v1/{uuid.uuid4()}", headers=ALICE if i % 2 else {})
    assert series() == before
