"""The gateway's middleware and body reader: read_body stops at the limit (declared or chunked),
BodySizeLimit answers 413 before AuthAndMetrics answers 401, only /v1/ routes need a key, and every
answer is counted in the metrics."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from services.gateway.middleware import BodyTooLarge, read_body

KEY = "key-0123456789"


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


def test_read_body_is_none_when_the_client_goes_away():
    receive, _ = receiver({"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"})
    assert asyncio.run(read_body(scope(), receive, 4)) is None


@pytest.fixture
def client():
    return TestClient(create_app(GatewayConfig(api_keys=(KEY,), max_body_bytes=1024)))


def counted(route: str, status: int) -> float:
    return REGISTRY.get_sample_value("rlhf_gateway_requests_total", {"route": route, "status": str(status)}) or 0


def test_an_oversized_body_gets_413_before_the_key_is_checked(client):
    before = counted("other", 413)
    r = client.post("/v1/chat/completions", content=b"x" * 2000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert counted("other", 413) == before + 1


def test_v1_routes_need_a_valid_key_and_the_refusal_is_counted(client):
    before = counted("/v1/models", 401)
    r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert counted("/v1/models", 401) == before + 1


def test_routes_outside_v1_need_no_key_and_are_counted_as_other(client):
    before = counted("other", 200)
    assert client.get("/metrics").status_code == 200
    assert counted("other", 200) == before + 1


def test_a_request_with_a_valid_key_reaches_the_route(client):
    # No inference service behind this app: validation answers first, in the OpenAI error shape.
    r = client.post(
        "/v1/chat/completions", json={"model": "m", "messages": []}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
