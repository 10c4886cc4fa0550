"""FeedbackFastPath and document_feedback_route on the app create_app builds, without any service
behind it: POST /v1/feedback is documented in /openapi.json as before, is served by the fast path
only (no FastAPI route), and keeps the checks of every route: 413 before 401, then the caller's
feedback rate limit (429), then the metrics."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from services.gateway.feedback.schema import FeedbackRequest, FeedbackResponse

KEY = "alice-key-0123456789abcdefghij"
RATING = {"type": "thumb", "response_id": "r", "thumb": "up", "feedback_tokens": ["t"], "user": "u"}
ALICE = {"Authorization": f"Bearer {KEY}"}


def requests_counted(status: int) -> float:
    return (
        REGISTRY.get_sample_value("rlhf_gateway_requests_total", {"route": "/v1/feedback", "status": str(status)}) or 0
    )


@pytest.fixture
def gateway():
    # No feedback address: the fast path answers 503, as a gateway with feedback turned off does.
    return create_app(GatewayConfig(api_keys=f"alice:{KEY}", max_body_bytes=1024))


def test_openapi_documents_post_feedback_with_its_request_response_and_error_schemas(gateway):
    schema = TestClient(gateway).get("/openapi.json", headers=ALICE).json()
    operation = schema["paths"]["/v1/feedback"]["post"]
    components = schema["components"]["schemas"]

    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["title"] == "FeedbackRequest" and body["additionalProperties"] is False
    assert set(body["properties"]) == set(FeedbackRequest.model_fields)
    assert body["required"] == ["type", "feedback_tokens"]  # `user` is an optional label

    responses = operation["responses"]
    assert set(responses) == {"200", "400", "401", "403", "429", "503"}
    ref = {status: r["content"]["application/json"]["schema"]["$ref"] for status, r in responses.items()}
    assert ref["200"] == "#/components/schemas/FeedbackResponse"
    assert {ref[s] for s in ("400", "401", "403", "429", "503")} == {"#/components/schemas/ErrorResponse"}
    assert set(components["FeedbackResponse"]["properties"]) == set(FeedbackResponse.model_fields)
    assert components["ErrorResponse"]["properties"]["error"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert set(components["ErrorBody"]["properties"]) == {"message", "type", "param", "code"}
    assert [responses[s]["description"] for s in ("200", "400", "401", "403", "429", "503")] == [
        "Successful Response",
        "Bad Request",
        "Unauthorized",
        "Forbidden",
        "Too Many Requests",
        "Service Unavailable",
    ]
    assert operation["operationId"] == "submit_feedback_v1_feedback_post"


def test_no_fastapi_route_serves_post_feedback(gateway):
    api = gateway.api
    assert not [r for r in api.routes if getattr(r, "path", None) == "/v1/feedback"]
    # The FastAPI app on its own does not know the route: only the fast path in front of it does.
    refused = TestClient(api).post("/v1/feedback", json=RATING, headers=ALICE)
    assert refused.status_code == 404 and "error" in refused.json()


def test_the_fast_path_serves_post_feedback_and_counts_it(gateway):
    before = requests_counted(503)
    r = TestClient(gateway).post("/v1/feedback", json=RATING, headers=ALICE)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "unavailable" and "feedback is not enabled" in r.json()["error"]["message"]
    assert requests_counted(503) == before + 1


def test_a_rating_without_a_valid_key_gets_401_and_is_counted(gateway):
    before = requests_counted(401)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer ключ".encode()}):
        r = TestClient(gateway).post("/v1/feedback", json=RATING, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests_counted(401) == before + 3


def test_ratings_over_the_principals_limit_get_429_with_retry_after():
    limited = TestClient(create_app(GatewayConfig(api_keys=f"alice:{KEY}", feedback_rate_per_min=1, feedback_burst=2)))
    assert [limited.post("/v1/feedback", json=RATING, headers=ALICE).status_code for _ in range(2)] == [503, 503]
    before = requests_counted(429)
    r = limited.post("/v1/feedback", json=RATING, headers=ALICE)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 55 <= int(r.headers["Retry-After"]) <= 60  # one rating a minute
    assert requests_counted(429) == before + 1


def test_an_anonymous_rater_gets_its_session_cookie_with_the_answer():
    anonymous = TestClient(create_app(GatewayConfig(anonymous=True)))
    r = anonymous.post("/v1/feedback", json=RATING)
    assert r.status_code == 503  # admitted (feedback is off on this gateway)
    assert "rlhf_session=" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]


def test_an_oversized_rating_gets_413_before_the_key_is_checked(gateway):
    r = TestClient(gateway).post("/v1/feedback", content=b"x" * 2000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_other_methods_on_the_feedback_path_go_to_fastapi(gateway):
    r = TestClient(gateway).get("/v1/feedback", headers=ALICE)
    assert r.status_code == 404 and "error" in r.json()
