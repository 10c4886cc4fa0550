"""The gateway's middleware and body reader: read_body stops at the limit (declared or chunked) and
at its timeout, BodySizeLimit answers 413 before AuthAndMetrics answers 401, only /v1/ routes (and
the API docs, when keys are configured) need a principal, chat completions are rate-limited per
principal (429 with Retry-After), and every answer is counted in the metrics under its route's
template: invented paths add no series."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from services.gateway.middleware import UNMATCHED, BodyTimeout, BodyTooLarge, RouteLabels, read_body

KEY = "alice-key-0123456789abcdefghij"
BOB_KEY = "bob-key-0123456789abcdefghijkl"
CHAT = {"model": "m", "messages": []}  # refused by validation: no inference service is needed


def receiver(*messages: dict):
    queue = list(messages)
    taken: list[dict] = []

    async def receive() -> dict:
        taken.append(queue.pop(0))
        return taken[-1]

    return receive, taken


def scope(headers: list[tuple[bytes, bytes]] | None = None) -> dict:
    return {"type": "http", "path": "/v1/feedback", "method": "POST", "headers": headers or []}


def test_read_body_joins_the_chunks_of_a_body_within_the_limit():
    receive, _ = receiver(
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    )
    assert asyncio.run(read_body(scope(), receive, 4)) == b"abcd"


def test_read_body_refuses_a_declared_length_over_the_limit_without_reading():
    receive, taken = receiver({"type": "http.request", "body": b"x" * 10})
    with pytest.raises(BodyTooLarge):
        asyncio.run(read_body(scope([(b"content-length", b"10")]), receive, 4))
    assert taken == []


def test_read_body_stops_reading_a_chunked_body_once_it_passes_the_limit():
    receive, taken = receiver(
        {"type": "http.request", "body": b"abc", "more_body": True},
        {"type": "http.request", "body": b"def", "more_body": True},
        {"type": "http.request", "body": b"ghi", "more_body": False},
    )
    with pytest.raises(BodyTooLarge):
        asyncio.run(read_body(scope(), receive, 4))
    assert len(taken) == 2


def test_read_body_gives_up_on_a_body_that_does_not_arrive_in_time():
    async def stalled() -> dict:
        await asyncio.sleep(10)
        return {"type": "http.request", "body": b"", "more_body": False}

    with pytest.raises(BodyTimeout):
        asyncio.run(read_body(scope(), stalled, 4, timeout_s=0.05))


def test_read_body_is_none_when_the_client_goes_away():
    receive, _ = receiver({"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"})
    assert asyncio.run(read_body(scope(), receive, 4)) is None


def app(**over):
    return create_app(GatewayConfig(**{"api_keys": f"alice:{KEY},bob:{BOB_KEY}", "max_body_bytes": 1024, **over}))


@pytest.fixture
def client():
    return TestClient(app())


def counted(route: str, status: int) -> float:
    return REGISTRY.get_sample_value("rlhf_gateway_requests_total", {"route": route, "status": str(status)}) or 0


def test_an_oversized_body_gets_413_before_the_key_is_checked(client):
    before = counted("/v1/chat/completions", 413)
    r = client.post("/v1/chat/completions", content=b"x" * 2000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert r.headers["connection"] == "close", "the rest of the body is never read"
    assert counted("/v1/chat/completions", 413) == before + 1


def test_v1_routes_need_a_valid_key_and_the_refusal_is_counted(client):
    before = counted("/v1/models", 401)
    r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert counted("/v1/models", 401) == before + 1
    r = client.get("/v1/models")
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]


@pytest.mark.parametrize("header", ["Bearer " + "ключ" * 8, "Bearer \udcff", "Bearer " + KEY + "é"])
def test_a_non_ascii_key_gets_401_not_500(client, header):
    raw = header.encode("utf-8", "surrogateescape")
    r = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": raw})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_no_keys_and_no_anonymous_mode_refuse_everyone():
    r = TestClient(create_app(GatewayConfig(max_body_bytes=1024))).post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 401


def test_routes_outside_v1_need_no_key_and_are_counted_by_their_route(client):
    before = counted("/metrics", 200)
    assert client.get("/metrics").status_code == 200
    assert counted("/metrics", 200) == before + 1


def request_series() -> int:
    return sum(len(m.samples) for m in REGISTRY.collect() if m.name.startswith("rlhf_gateway_request"))


def test_300_invented_paths_add_no_series_to_the_request_metrics(client):
    alice = {"Authorization": f"Bearer {KEY}"}
    for path in ("/v1/x", "/nope"):  # the unmatched label's own series, with and without a key
        client.get(path)
        client.get(path, headers=alice)
    before, unmatched = request_series(), counted(UNMATCHED, 404) + counted(UNMATCHED, 401)
    for i in range(300):
        path = f"/v1/{uuid.uuid4()}" if i % 2 else f"/{uuid.uuid4()}/{uuid.uuid4()}"
        r = client.get(path, headers=alice if i % 3 else {})
        assert r.status_code in (401, 404)
    assert request_series() == before
    assert counted(UNMATCHED, 404) + counted(UNMATCHED, 401) == unmatched + 300


def test_route_labels_name_the_template_not_the_path():
    labels = RouteLabels(app().api.router.routes)

    def label(method: str, path: str) -> str:
        return labels({"type": "http", "method": method, "path": path, "headers": [], "query_string": b""})

    assert label("GET", "/v1/models/rlhf-policy") == "/v1/models/{model_id:path}"
    assert label("GET", "/v1/models/org/name") == "/v1/models/{model_id:path}"
    assert label("POST", "/v1/chat/completions") == "/v1/chat/completions"
    assert label("GET", "/v1/chat/completions") == "/v1/chat/completions", "405 still names the route"
    assert label("GET", f"/v1/{uuid.uuid4()}") == UNMATCHED


def test_metrics_can_be_kept_off_the_api_port():
    off = TestClient(app(metrics_on_api_port=False, metrics_port=9999))
    assert off.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_the_api_docs_need_a_key_when_keys_are_configured_unless_public(client):
    for path in ("/docs", "/openapi.json"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
    anonymous = TestClient(app(anonymous=True))
    assert anonymous.get("/openapi.json").status_code == 401, "an anonymous session is not a key"
    assert TestClient(app(public_docs=True)).get("/openapi.json").status_code == 200
    assert TestClient(app(api_keys="", anonymous=True)).get("/docs").status_code == 200  # no keys to ask for


def test_a_request_with_a_valid_key_reaches_the_route(client):
    # No inference service behind this app: validation answers first, in the OpenAI error shape.
    r = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_chat_completions_are_limited_per_principal_with_retry_after():
    limited = TestClient(app(chat_rate_per_min=6, chat_burst=2))
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in (KEY, BOB_KEY))
    assert [limited.post("/v1/chat/completions", json=CHAT, headers=alice).status_code for _ in range(2)] == [400, 400]
    before = counted("/v1/chat/completions", 429)
    r = limited.post("/v1/chat/completions", json=CHAT, headers=alice)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert 1 <= int(r.headers["Retry-After"]) <= 10
    assert counted("/v1/chat/completions", 429) == before + 1
    assert limited.post("/v1/chat/completions", json=CHAT, headers=bob).status_code == 400, "bob has his own"
    assert limited.get("/v1/session", headers=alice).status_code == 200, "only chat completions take from it"


def test_a_conversation_id_must_be_a_plain_id(client):
    bad = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "conversation_id": "a b"}
    r = client.post("/v1/chat/completions", json=bad, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "conversation_id"
