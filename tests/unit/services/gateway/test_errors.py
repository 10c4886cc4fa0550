"""What an HTTP client is told of an upstream failure: the service's own answer about the request
for the codes that carry one, otherwise a generic sentence with a request id, never the upstream
text (addresses, exceptions), which goes to the gateway's log under that id."""

from __future__ import annotations

import logging

import grpc
import pytest

from services.gateway.errors import PASSED_ON, UpstreamRefusal, public_message, request_id, response_for

LEAKY = "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:50051: Connection refused"


@pytest.mark.parametrize("code", sorted(PASSED_ON, key=lambda c: c.name))
def test_the_services_answer_about_the_request_is_passed_on(code):
    assert public_message(code, "n must be between 1 and 4, got 9", "req-1") == "n must be between 1 and 4, got 9"


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.DATA_LOSS,
    ],
)
def test_any_other_upstream_text_is_replaced_by_a_generic_message_with_a_request_id(code):
    message = public_message(code, LEAKY, "req-0123456789abcdef")
    assert "10.0.0.7" not in message and "Connection refused" not in message
    assert message.endswith("(request id req-0123456789abcdef)")


def test_request_ids_are_fresh():
    assert len({request_id() for _ in range(100)}) == 100


def test_an_item_refused_in_a_batch_hides_the_upstream_text_and_logs_it(caplog):
    with caplog.at_level(logging.WARNING, logger="services.gateway.errors"):
        refusal = UpstreamRefusal(grpc.StatusCode.INTERNAL.value[0], LEAKY, None)
    response = response_for(refusal, "/v1/feedback")
    assert response.status_code == 502 and b"10.0.0.7" not in response.body
    rid = refusal.message.rsplit("request id ", 1)[1].rstrip(")")
    assert any(rid in r.getMessage() and "10.0.0.7" in r.getMessage() for r in caplog.records)


def test_an_item_refused_for_its_content_keeps_the_services_message():
    refusal = UpstreamRefusal(grpc.StatusCode.PERMISSION_DENIED.value[0], "feedback token expired", "feedback_tokens")
    response = response_for(refusal, "/v1/feedback")
    assert response.status_code == 403 and b"feedback token expired" in response.body


def test_an_unexpected_error_answers_500_with_a_request_id_and_no_detail():
    response = response_for(RuntimeError("secret path /var/lib/x"), "/v1/models")
    assert response.status_code == 500
    assert b"secret path" not in response.body and b"request id req-" in response.body
