"""The ledger is bounded: it forgets votes whose tokens have all expired, keeps no comment text, and
holds at most max_votes (the oldest evicted, later revisions numbered above what it evicted)."""

import pytest
from prometheus_client import REGISTRY

from services.feedback.ledger import FeedbackLedger, LiveVote, comment_digest, forget_before
from shared.events import FeedbackEvent, RatedResponse

T0 = 1_700_000_000.0


def vote(n: int, received_at: float, revision: int = 1, user: str = "u1", key: str = "", comment: str = ""):
    return FeedbackEvent(
        feedback_id=f"f{n}-{revision}",
        kind="thumb",
        user_id=user,
        target=f"thumb:r{n}",
        revision=revision,
        supersedes=None,
        responses=[RatedResponse(f"r{n}", "policy-0001", "p")],
        thumb="up",
        comment=comment,
        idempotency_key=key,
        received_at=received_at,
    )


def metric(name):
    return REGISTRY.get_sample_value(name) or 0.0


def test_forget_before_is_the_token_lifetime_and_the_slack_ago():
    assert forget_before(1000.0, token_ttl_s=600, slack_s=60) == 340.0


def test_votes_are_forgotten_once_their_tokens_have_expired():
    ledger = FeedbackLedger(token_ttl_s=100, slack_s=10, max_votes=10)
    ledger.apply(vote(1, T0, key="k1"), now=T0)
    ledger.apply(vote(2, T0 + 50), now=T0 + 50)
    assert ledger.live("u1", "thumb:r1") is not None and ledger.by_key("u1", "k1") is not None
    expired = metric("rlhf_feedback_ledger_expired_total")
    assert ledger.expire(now=T0 + 111) == 1
    assert ledger.live("u1", "thumb:r1") is None and ledger.by_key("u1", "k1") is None and not ledger.has("f1-1")
    assert ledger.has("f2-1") and len(ledger) == 1
    assert metric("rlhf_feedback_ledger_expired_total") - expired == 1
    ledger.apply(vote(3, T0), now=T0 + 200)  # a replayed record older than the horizon is not kept
    assert not ledger.has("f3-1")


def test_an_older_revision_expiring_keeps_the_live_newer_one():
    ledger = FeedbackLedger(token_ttl_s=100, slack_s=0, max_votes=10)
    ledger.apply(vote(1, T0, revision=1), now=T0)
    ledger.apply(vote(1, T0 + 60, revision=2), now=T0 + 60)
    ledger.expire(now=T0 + 101)
    assert ledger.live("u1", "thumb:r1").revision == 2


def test_no_comment_text_is_kept():
    ledger = FeedbackLedger()
    ledger.apply(vote(1, T0, comment="a long comment " * 100), now=T0)
    live = ledger.live("u1", "thumb:r1")
    assert live.comment == comment_digest("a long comment " * 100) and len(live.comment) == 8
    assert "comment" not in repr(live).replace("comment=", "")
    assert comment_digest("") == b"" and comment_digest("a") != comment_digest("b")
    assert LiveVote.of(vote(1, T0)).comment == b""


def test_a_full_ledger_evicts_the_oldest_and_numbers_above_what_it_evicted():
    ledger = FeedbackLedger(token_ttl_s=100, slack_s=0, max_votes=2)
    ledger.apply(vote(1, T0, revision=3), now=T0)
    ledger.apply(vote(2, T0 + 1), now=T0 + 1)
    assert ledger.next_revision(None) == 1, "nothing evicted: a first vote is revision 1"
    evicted = metric("rlhf_feedback_ledger_evicted_total")
    ledger.apply(vote(3, T0 + 2), now=T0 + 2)
    assert len(ledger) == 2 and not ledger.has("f1-3") and ledger.has("f3-1")
    assert ledger.live("u1", "thumb:r1") is None
    assert metric("rlhf_feedback_ledger_evicted_total") - evicted == 1
    assert metric("rlhf_feedback_ledger_votes") == 2
    # r1's live vote (revision 3) is gone: a change of it must still be numbered above 3.
    assert ledger.next_revision(None) == 4
    assert ledger.next_revision(ledger.live("u1", "thumb:r2")) == 2, "a known vote: its revision + 1"


def test_votes_that_expire_raise_no_floor():
    ledger = FeedbackLedger(token_ttl_s=100, slack_s=0, max_votes=10)
    ledger.apply(vote(1, T0, revision=5), now=T0)
    ledger.expire(now=T0 + 101)
    assert ledger.next_revision(None) == 1, "an expired vote can no longer change"


def test_max_votes_must_be_positive():
    with pytest.raises(ValueError, match="max_votes"):
        FeedbackLedger(max_votes=0)
