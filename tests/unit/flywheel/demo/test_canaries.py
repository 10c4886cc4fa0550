"""What the demo reads off the canaries (flywheel/demo/canaries.py): each canary's period and verdict,
the share it was given and the share it served, the sabotage run's figures (automatic rollback,
answers, share, users outside the share), and the trainer gate's discrimination."""

from __future__ import annotations

import pytest

from flywheel.demo.canaries import (
    answers_by_version,
    canary_periods,
    canary_verdicts,
    gate_counts_from_metrics,
    gate_discrimination,
    sabotage_outcome,
    served_canary_share,
    share_steps,
)
from services.gateway.rollout.routing import in_canary

T0 = 1_000_000.0


def event(seq, at, version, stage, *, stable="policy-0001", canary="", share=0.0, reason="", evidence=None):
    return {
        "sequence": seq,
        "version": version,
        "stage": stage,
        "reason": reason,
        "stable": stable,
        "canary": canary,
        "canary_share": share,
        "paused": False,
        "mode": "auto",
        "queued": "",
        "evidence": evidence or {},
        "at": T0 + at,
    }


THUMBS = {"canary_n": 40, "canary_mean": 0.05, "stable_n": 300, "stable_mean": 0.8, "verdict": "rollback"}
EVENTS = [
    event(1, 10, "policy-0002", "canary", canary="policy-0002", share=0.3),
    event(2, 100, "policy-0002", "promoted", stable="policy-0002", reason="non-inferior on thumbs with 40 ratings"),
    event(3, 120, "policy-0003", "canary", stable="policy-0002", canary="policy-0003", share=0.3),
    event(
        4,
        160,
        "policy-0003",
        "rolled_back",
        stable="policy-0002",
        reason="worse than the stable version on thumbs",
        evidence={"thumbs": THUMBS, "alpha_per_signal": 0.0125, "canary": {}, "stable": {}},
    ),
    event(5, 170, "policy-0004", "canary", stable="policy-0002", canary="policy-0004", share=0.3),
]


def rec(at, versions, *, principal="sim-user-0", conversation="c", kind="thumb", ups=None):
    return {
        "t": at,
        "at": T0 + at,
        "kind": kind,
        "policy_version": versions[0] if versions else "",
        "choice_versions": versions,
        "responses": ["x"] * len(versions),
        "gold_thumbs_up": ups if ups is not None else [True] * len(versions),
        "principal": principal,
        "conversation_id": conversation,
    }


def test_canary_periods_and_verdicts():
    periods = canary_periods(EVENTS)
    assert [(p["version"], p["outcome"]) for p in periods] == [
        ("policy-0002", "promoted"),
        ("policy-0003", "rolled_back"),
        ("policy-0004", "running"),
    ]
    recs = [rec(20, ["policy-0002"]), rec(30, ["policy-0001"]), rec(130, ["policy-0003", "policy-0002"])]
    recs += [rec(140, ["policy-0002"]), rec(150, ["policy-0002"]), rec(200, ["policy-0004"])]
    v2, v3, v4 = canary_verdicts(EVENTS, recs)
    assert (v2["duration_s"], v2["answers"], v2["answers_in_period"], v2["share_of_answers"]) == (90.0, 1, 2, 0.5)
    assert v3["outcome"] == "rolled_back" and v3["reason"].startswith("worse")
    assert v3["answers"] == 1 and v3["answers_in_period"] == 4 and v3["share_of_answers"] == 0.25
    assert v3["thumbs_canary"] == (40, 0.05) and v3["thumbs_stable"] == (300, 0.8)
    assert v3["verdicts"] == {"thumbs": "rollback"} and v3["side_by_side"] is None
    assert v4["outcome"] == "running" and v4["duration_s"] == 30.0 and v4["answers"] == 1


def test_answers_count_each_choice_for_the_version_that_wrote_it():
    recs = [rec(1, ["policy-0003", "policy-0002"]), rec(0, ["policy-0002"]), {**rec(2, []), "kind": "error"}]
    old = {**rec(3, []), "choice_versions": [], "policy_version": "policy-0001", "responses": ["a", "b"]}
    assert answers_by_version([*recs, old]) == [
        (T0, "policy-0002"),
        (T0 + 1, "policy-0002"),
        (T0 + 1, "policy-0003"),
        (T0 + 3, "policy-0001"),
        (T0 + 3, "policy-0001"),
    ]


def test_share_steps_and_the_share_served():
    steps = share_steps(EVENTS)
    assert [(t - T0, c, s) for t, c, s in steps] == [
        (10, "policy-0002", 0.3),
        (100, "", 0.0),
        (120, "policy-0003", 0.3),
        (160, "", 0.0),
        (170, "policy-0004", 0.3),
    ]
    recs = [rec(20, ["policy-0002"]), rec(25, ["policy-0001"]), rec(101, ["policy-0002"]), rec(125, ["policy-0003"])]
    served = served_canary_share(recs, steps, window_s=50.0)
    # At 101 s no canary runs: policy-0002 is the stable version then; the window still holds 20 s and 25 s.
    assert [(t - T0, round(x, 3)) for t, x in served] == [(20, 1.0), (25, 0.5), (101, 0.0), (125, 0.5)]


def _assigned(version, share, want, n=200):
    """Conversation ids of sim-user-0 that the routing rule puts in (want=True) or out of the canary."""
    return [f"c{i}" for i in range(n) if in_canary(version, share, "sim-user-0", f"c{i}") is want]


def test_sabotage_outcome_counts_the_bad_versions_answers_and_who_saw_them():
    bad = "policy-0003"
    inside, outside = _assigned(bad, 0.3, True), _assigned(bad, 0.3, False)
    recs = [rec(130 + i, [bad], conversation=c) for i, c in enumerate(inside[:3])]
    recs += [rec(125 + i, ["policy-0002"], conversation=c) for i, c in enumerate(outside[:9])]
    out = sabotage_outcome(recs, EVENTS, bad, injected_at=T0 + 115)
    assert out["rolled_back"] and out["automatic"] and out["reason"] == "worse than the stable version on thumbs"
    assert (out["seconds_to_rollback"], out["seconds_from_injection"], out["canary_share"]) == (40.0, 45.0, 0.3)
    assert (out["answers_served"], out["answers_in_period"]) == (3, 12) and out["share_of_answers"] == 0.25
    assert out["served_outside_share"] == 0 and out["principals_outside_share"] == []
    # One answer of the bad version to a conversation the rule kept on the stable version: counted.
    leaked = sabotage_outcome([*recs, rec(150, [bad], conversation=outside[0])], EVENTS, bad)
    assert leaked["served_outside_share"] == 1 and leaked["principals_outside_share"] == ["sim-user-0"]


def test_a_sabotage_rolled_back_by_an_operator_or_never_canaried_is_not_automatic():
    operator = [*EVENTS[:3], {**EVENTS[3], "reason": "rolled back by an operator"}]
    assert not sabotage_outcome([], operator, "policy-0003")["automatic"]
    never = sabotage_outcome([], EVENTS, "policy-0009")
    assert never["canary_started"] is False and never["rolled_back"] is False and "share_of_answers" not in never


def gate(step, *, published=False, refused_by="", compared=True, same=False, rollback=False, guards=()):
    return {
        "step": step,
        "published": published,
        "rollback": rollback,
        "refused_by": refused_by,
        "compared": compared,
        "same_as_baseline": same,
        "guards": [{"name": g} for g in guards],
    }


TRAINER_METRICS = """\
# TYPE rlhf_trainer_gate_refused_total counter
rlhf_trainer_gate_refused_total{reason="kl"} 3.0
rlhf_trainer_gate_refused_total{reason="frozen_rm:rm-0001"} 2.0
# TYPE rlhf_trainer_gate_compared_total counter
rlhf_trainer_gate_compared_total 10.0
# TYPE rlhf_trainer_gate_same_as_baseline_total counter
rlhf_trainer_gate_same_as_baseline_total 1.0
# TYPE rlhf_trainer_published_total counter
rlhf_trainer_published_total 5.0
# TYPE rlhf_trainer_reverts_total counter
rlhf_trainer_reverts_total{reason="kl_bound"} 2.0
rlhf_trainer_reverts_total{reason="refusals"} 1.0
"""


def test_gate_discrimination_from_the_decisions_and_the_trainers_counters():
    gates = [
        gate(5, published=True, compared=False),  # the first candidate: no baseline yet
        gate(10, refused_by="kl"),
        gate(15, published=True, same=True, guards=["frozen_rm:rm-0001"]),
        gate(20, refused_by="frozen_rm:rm-0001", guards=["frozen_rm:rm-0001"]),
        gate(20, published=True, rollback=True, compared=False),  # an operator's rollback: not a candidate
    ]
    g = gate_discrimination(gates, TRAINER_METRICS)
    assert (g["candidates"], g["published"], g["compared"], g["same_as_baseline"]) == (4, 2, 3, 1)
    assert g["differed_share"] == pytest.approx(2 / 3)
    assert g["refused_by"] == {"kl": 1, "frozen_rm:rm-0001": 1} and g["guards"] == ["frozen_rm:rm-0001"]
    assert g["metrics"] == gate_counts_from_metrics(TRAINER_METRICS)
    assert g["metrics"]["differed_share"] == 0.9 and g["metrics"]["refused_by"] == {
        "frozen_rm:rm-0001": 2,
        "kl": 3,
    }
    assert g["metrics"]["reverts"] == {"kl_bound": 2, "refusals": 1}
    assert gate_discrimination([])["differed_share"] is None
