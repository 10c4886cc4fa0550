"""The rollout state machine: candidates, the canary slot and its queue, gate decisions, operator
steps, and rebuilding the state from the events after a restart."""

from __future__ import annotations

import pytest

from services.rollout.lifecycle import Lifecycle, RolloutState
from shared.errors import FailedPrecondition, InvalidArgument


def lifecycle() -> Lifecycle:
    return Lifecycle(RolloutState(stable="policy-0001"), canary_share=0.1)


def stages(events) -> list[tuple[str, str]]:
    return [(e.version, e.stage) for e in events]


def test_a_candidate_takes_the_free_canary_slot_with_its_share():
    lc = lifecycle()
    [ev] = lc.candidate("policy-0002", now=10)
    assert (ev.stage, ev.canary, ev.canary_share, ev.stable, ev.sequence) == ("canary", "policy-0002", 0.1,
                                                                              "policy-0001", 1)  # fmt: skip
    assert lc.state.canary_since == 10


def test_while_a_canary_runs_only_the_newest_candidate_waits():
    lc = lifecycle()
    lc.candidate("policy-0002", now=1)
    assert stages(lc.candidate("policy-0003", now=2)) == [("policy-0003", "candidate")]
    assert stages(lc.candidate("policy-0004", now=3)) == [("policy-0003", "superseded"), ("policy-0004", "candidate")]
    assert lc.state.queued == "policy-0004" and lc.candidate("policy-0004", now=4) == []


def test_promotion_makes_the_canary_stable_and_starts_the_next():
    lc = lifecycle()
    lc.candidate("policy-0002", now=1)
    lc.candidate("policy-0003", now=2)
    events = lc.decide("promote", "non-inferior", {"thumbs": {"verdict": "promote"}}, now=3)
    assert stages(events) == [("policy-0002", "promoted"), ("policy-0003", "canary")]
    assert events[0].stable == "policy-0002" and events[0].evidence == {"thumbs": {"verdict": "promote"}}
    assert (lc.state.stable, lc.state.canary, lc.state.queued) == ("policy-0002", "policy-0003", "")


def test_a_rollback_keeps_the_stable_version():
    lc = lifecycle()
    lc.candidate("policy-0002", now=1)
    [ev] = lc.decide("rollback", "worse on thumbs", {}, now=2)
    assert (ev.stage, ev.stable, ev.canary, ev.canary_share) == ("rolled_back", "policy-0001", "", 0.0)


def test_paused_and_manual_ignore_the_gate_but_not_operators():
    lc = lifecycle()
    lc.candidate("policy-0002", now=1)
    assert stages(lc.pause(now=2)) == [("policy-0002", "paused")] and lc.state.paused
    assert lc.decide("rollback", "worse", {}, now=3) == []
    lc.resume(now=4)
    lc.set_mode("manual", now=5)
    assert lc.decide("promote", "better", {}, now=6) == []
    assert stages(lc.rollback("policy-0002", now=7)) == [("policy-0002", "rolled_back")]


def test_no_candidate_starts_while_paused_and_the_queue_starts_on_resume():
    lc = lifecycle()
    lc.pause(now=1)
    assert stages(lc.candidate("policy-0002", now=2)) == [("policy-0002", "candidate")]
    assert stages(lc.resume(now=3)) == [("policy-0001", "resumed"), ("policy-0002", "canary")]


def test_operator_commands_are_checked():
    lc = lifecycle()
    with pytest.raises(FailedPrecondition, match="no version is in canary"):
        lc.promote("policy-0002", now=1)
    lc.candidate("policy-0002", now=1)
    with pytest.raises(FailedPrecondition, match="not the canary"):
        lc.rollback("policy-0009", now=2)
    with pytest.raises(InvalidArgument):
        lc.set_mode("yolo", now=2)
    with pytest.raises(ValueError):
        Lifecycle(RolloutState("policy-0001"), canary_share=1.0)


def test_the_state_is_rebuilt_from_the_events_and_replays_change_nothing():
    lc = lifecycle()
    events = [*lc.candidate("policy-0002", 1), *lc.candidate("policy-0003", 2), *lc.decide("rollback", "x", {}, 3)]
    events += lc.pause(4)
    rebuilt = RolloutState.rebuilt("policy-0001", events)
    assert rebuilt == lc.state
    replayed = RolloutState.rebuilt("policy-0001", events + events[:2])
    assert replayed == lc.state
    # A restarted controller goes on numbering where the topic stopped.
    assert Lifecycle(rebuilt, 0.1).resume(now=5)[0].sequence == events[-1].sequence + 1


def test_a_queued_candidate_keeps_what_it_was_gated_on():
    lc = lifecycle()
    lc.candidate("policy-0002", now=1, evidence={"candidate": {"metrics": {"heldout_reward": 0.5}}})
    [queued] = lc.candidate("policy-0003", now=2, evidence={"candidate": {"metrics": {"heldout_reward": 0.7}}})
    assert queued.stage == "candidate" and queued.evidence == {"candidate": {"metrics": {"heldout_reward": 0.7}}}
