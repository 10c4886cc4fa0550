"""The rating forwarded to the feedback service: the voter is the principal the gateway
authenticated; the client's `user` field travels only as a label."""

from __future__ import annotations

from services.gateway.feedback.schema import FeedbackRequest
from services.gateway.feedback.serving import to_submit_request


def test_the_principal_is_the_gateways_and_user_only_a_label():
    req = FeedbackRequest(type="thumb", response_id="r1", thumb="up", feedback_tokens=["t"], user="mallory")
    msg = to_submit_request(req, None, "alice")
    assert (msg.principal, msg.user_id) == ("alice", "mallory")
    unlabelled = to_submit_request(
        FeedbackRequest(type="thumb", response_id="r1", thumb="up", feedback_tokens=["t"]), None, "bob"
    )
    assert (unlabelled.principal, unlabelled.user_id) == ("bob", "")
