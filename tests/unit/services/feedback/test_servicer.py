"""The servicer's conversion: the caller's principal is the voter, the client's user id a label."""

from __future__ import annotations

from services.feedback.servicer import submission_from_proto
from shared.pb import feedback_pb2


def test_the_principal_is_the_voter_and_user_id_the_label():
    msg = feedback_pb2.SubmitFeedbackRequest(
        thumb=feedback_pb2.ThumbRating(response_id="r1", thumb=feedback_pb2.THUMB_UP),
        feedback_tokens=["t"],
        principal="alice",
        user_id="says-it-is-bob",
    )
    sub = submission_from_proto(msg)
    assert (sub.principal, sub.label, sub.thumb, sub.response_ids) == ("alice", "says-it-is-bob", "up", ["r1"])
    assert submission_from_proto(feedback_pb2.SubmitFeedbackRequest(user_id="bob")).principal == ""
