"""The learner's SQLite state: tied to its model store, and to the identity of the topics its
offsets belong to; a recreated feedback topic starts a vote epoch, whose votes supersede older ones
whatever their revisions."""

from services.reward.retraining_state import RetrainingState
from shared.events import FeedbackEvent, RatedResponse

FB = ("rlhf.feedback", 0)
CO = ("rlhf.completions", 0)


def vote(fid: str, revision: int, received_at: float, order: tuple[str, str] = ("x", "y")) -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=fid,
        kind="ranking",
        user_id="u1",
        target="ranking:x,y",
        revision=revision,
        supersedes=None,
        responses=[RatedResponse(i, "policy-0001", "p") for i in order],
        received_at=received_at,
    )


def test_a_state_of_another_store_is_moved_aside_and_a_fresh_one_started(tmp_path):
    path = tmp_path / "learner.sqlite3"
    a = RetrainingState(path, store_id="a" * 32)
    a.ingest([vote("f1", 1, 1.0)], [], {FB: 5}, now=2.0)
    a.close()
    b = RetrainingState(path, store_id="b" * 32)
    assert b.store_id == "b" * 32 and b.live_votes() == [] and b.offsets() == {}, "fresh: rebuilt from the topics"
    b.close()
    kept = RetrainingState(tmp_path / f"learner.sqlite3.store-{'a' * 32}")
    assert [v.event.feedback_id for v in kept.live_votes()] == ["f1"], "store A's state is kept aside, not lost"
    kept.close()
    again = RetrainingState(path, store_id="b" * 32)
    assert again.store_id == "b" * 32
    again.close()


def test_a_state_from_before_store_ids_is_adopted(tmp_path):
    path = tmp_path / "learner.sqlite3"
    old = RetrainingState(path)
    old.ingest([vote("f1", 1, 1.0)], [], {FB: 5}, now=2.0)
    old.close()
    state = RetrainingState(path, store_id="a" * 32)
    assert state.store_id == "a" * 32 and state.offsets() == {FB: 5} and len(state.live_votes()) == 1
    state.close()


def test_a_recreated_topic_loses_its_offsets_and_starts_a_vote_epoch(tmp_path):
    state = RetrainingState(tmp_path / "s.sqlite3")
    assert state.adopt_identities({FB: "id:one", CO: "id:c"}) == [], "first sight: nothing recreated"
    state.ingest([vote("f3", 3, 10.0)], [], {FB: 500, CO: 40}, now=11.0)
    assert state.identities() == {FB: "id:one", CO: "id:c"}

    assert state.adopt_identities({FB: "id:two", CO: "id:c"}) == [FB]
    assert state.offsets() == {CO: 40}, "the recreated partition is read from its start"
    assert state.vote_epoch == 1
    # The feedback service numbers from 1 again on the new topic: that vote is the newer one.
    state.ingest([vote("g1", 1, 20.0, order=("y", "x"))], [], {FB: 1}, now=21.0)
    [live] = state.live_votes()
    assert live.event.feedback_id == "g1"
    # Within the epoch the usual rule holds: a redelivery changes nothing, a revision supersedes.
    state.ingest([vote("g1", 1, 20.0, order=("y", "x"))], [], {FB: 2}, now=22.0)
    state.ingest([vote("g2", 2, 30.0)], [], {FB: 3}, now=31.0)
    assert [v.event.feedback_id for v in state.live_votes()] == ["g2"]
    state.close()

    reopened = RetrainingState(tmp_path / "s.sqlite3")
    assert reopened.vote_epoch == 1 and reopened.identities()[FB] == "id:two"
    assert reopened.adopt_identities({FB: "id:two", CO: "id:c"}) == [] and reopened.vote_epoch == 1
    reopened.close()


def test_a_recreated_completions_topic_keeps_the_vote_epoch(tmp_path):
    state = RetrainingState(tmp_path / "s.sqlite3")
    state.adopt_identities({FB: "id:f", CO: "first:0:100"})
    assert state.adopt_identities({FB: "id:f", CO: "first:0:900"}) == [CO]
    assert state.vote_epoch == 0
    state.close()
