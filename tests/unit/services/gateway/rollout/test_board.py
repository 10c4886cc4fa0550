"""The /flywheel data: thumbs-up intervals by the gate's formula, each version's latest figures from
the events' evidence (a promotion's "stable" arm is the version it replaced), the roles and shares
of the latest state, the decisions newest first, and bounds on what is kept."""

from __future__ import annotations

import math

import pytest

from services.gateway.rollout.board import FlywheelBoard, arm_summaries, decision_of, thumbs_interval
from services.gateway.rollout.routing import CANARY, Router
from shared.events import RolloutEvent


def summary(rate: float | None, n: int) -> dict:
    return {
        "thumbs_up_rate": rate,
        "thumbs": n,
        "likert_mean": 5.5,
        "likerts": 3,
        "completions": 40,
        "error_rate": 0.0,
        "latency_p50_s": 0.2,
        "latency_p90_s": 0.4,
        "mean_tokens": 31.0,
    }


def event(
    sequence: int, stage: str, version: str, *, stable: str, canary: str = "", share=0.1, evidence=None, queued=""
):
    return RolloutEvent(
        sequence=sequence,
        version=version,
        stage=stage,
        reason=f"reason {sequence}",
        stable=stable,
        canary=canary,
        canary_share=share if canary else 0.0,
        paused=False,
        mode="auto",
        queued=queued,
        evidence=evidence or {},
        at=100.0 * sequence,
    )


def gate_evidence(canary_rate: float, stable_rate: float, n: int, verdict: str) -> dict:
    return {
        "thumbs": {
            "canary_n": n,
            "canary_mean": canary_rate,
            "stable_n": n,
            "stable_mean": stable_rate,
            "difference": [-0.31, -0.02],
            "verdict": verdict,
        },
        "no_error": {"verdict": "continue", "difference": [-0.1, 0.1]},
        "alpha_per_signal": 0.025,
        "canary": summary(canary_rate, n),
        "stable": summary(stable_rate, n),
    }


def test_thumbs_interval_is_the_normal_mixture_sequence():
    n, ups, alpha, rho = 100, 60, 0.05, 25.0
    v = n / 4
    r = math.sqrt((v + rho) * math.log((v + rho) / (rho * (alpha / 2) ** 2))) / n
    assert thumbs_interval(ups, n) == [round(0.6 - r, 4), round(0.6 + r, 4)]
    assert thumbs_interval(0, 0) is None
    assert thumbs_interval(3, 3) == [pytest.approx(thumbs_interval(3, 3)[0]), 1.0]  # clipped to [0, 1]
    widths = [thumbs_interval(k // 2, k)[1] - thumbs_interval(k // 2, k)[0] for k in (10, 100, 1000, 10000)]
    assert widths == sorted(widths, reverse=True), "more ratings, a narrower interval"


def test_a_promotion_compares_the_canary_with_the_stable_version_it_replaces():
    ev = event(5, "promoted", "policy-0008", stable="policy-0008", evidence=gate_evidence(0.7, 0.6, 50, "promote"))
    arms = arm_summaries(ev, stable_before="policy-0007")
    assert arms["policy-0008"]["thumbs_up_rate"] == 0.7 and arms["policy-0007"]["thumbs_up_rate"] == 0.6
    assert arm_summaries(event(1, "canary", "policy-0008", stable="policy-0007"), "policy-0007") == {}
    guard_only = event(1, "canary", "policy-0008", stable="policy-0007", evidence={"canary": "not a summary"})
    assert arm_summaries(guard_only, "policy-0007") == {}


def test_a_decision_carries_the_verdicts_and_the_thumbs_interval():
    d = decision_of(
        event(4, "rolled_back", "policy-0008", stable="policy-0007", evidence=gate_evidence(0.3, 0.6, 80, "rollback"))
    )
    assert (d.stage, d.version, d.reason, d.sequence) == ("rolled_back", "policy-0008", "reason 4", 4)
    assert d.verdicts == {"thumbs": "rollback", "no_error": "continue"}
    assert d.thumbs_difference == [-0.31, -0.02]
    assert decision_of(event(1, "canary", "policy-0008", stable="policy-0007")).verdicts == {}


def test_the_view_shows_the_roles_shares_figures_and_decisions_newest_first():
    board, router = FlywheelBoard(max_events=10), Router(canary_enabled=True)
    steps = [
        event(1, "canary", "policy-0008", stable="policy-0007", canary="policy-0008", share=0.2),
        event(2, "candidate", "policy-0009", stable="policy-0007", canary="policy-0008", share=0.2, queued="policy-0009"),
        event(3, "paused", "policy-0008", stable="policy-0007", canary="policy-0008", share=0.2, queued="policy-0009",
              evidence=gate_evidence(0.5, 0.6, 40, "continue")),
    ]  # fmt: skip
    for ev in steps:
        router.apply(ev)
        board.add(ev)
    router.count(CANARY)
    view = board.view(router, following=True)
    assert (view.stable, view.canary, view.queued, view.canary_share, view.sequence) == (
        "policy-0007", "policy-0008", "policy-0009", 0.2, 3,
    )  # fmt: skip
    roles = {v.role: v for v in view.versions}
    assert roles["stable"].traffic_share == 0.8 and roles["canary"].traffic_share == 0.2
    assert roles["queued"].traffic_share == 0.0 and roles["queued"].thumbs_up_rate is None
    assert roles["canary"].thumbs_up_rate == 0.5 and roles["canary"].thumbs == 40
    assert roles["canary"].thumbs_interval == thumbs_interval(20, 40)
    assert roles["canary"].evidence_at == 300.0 and roles["canary"].since == 100.0
    assert roles["stable"].thumbs_up_rate == 0.6
    assert [d.sequence for d in view.decisions] == [3, 2, 1]
    assert view.routed.canary == 1 and view.following and view.canary_routing


def test_without_a_canary_group_the_canary_gets_no_share_on_this_gateway():
    board, router = FlywheelBoard(max_events=10), Router(canary_enabled=False)
    ev = event(1, "canary", "policy-0008", stable="policy-0007", canary="policy-0008", share=0.2)
    router.apply(ev)
    board.add(ev)
    view = board.view(router, following=False)
    assert view.canary_share == 0.0 and not view.canary_routing and not view.following
    assert {v.role: v.traffic_share for v in view.versions} == {"stable": 1.0, "canary": 0.0}


def test_an_empty_board_is_a_valid_view():
    view = FlywheelBoard(max_events=3).view(Router(canary_enabled=True), following=False)
    assert view.versions == [] and view.decisions == [] and view.sequence == 0 and view.updated_at is None


def test_events_and_versions_kept_are_bounded():
    board = FlywheelBoard(max_events=3)
    for i in range(1, 20):
        version = f"policy-{i:04d}"
        board.add(
            event(i, "rolled_back", version, stable="policy-0001", evidence=gate_evidence(0.3, 0.6, 50, "rollback"))
        )
    assert [e.sequence for e in board.events] == [17, 18, 19]
    assert len(board.figures) == 3 and "policy-0019" in board.figures and "policy-0001" in board.figures
    with pytest.raises(ValueError):
        FlywheelBoard(max_events=0)


def test_figures_that_are_not_numbers_are_shown_as_unknown():
    board, router = FlywheelBoard(max_events=5), Router(canary_enabled=True)
    bad = {"canary": {"thumbs": "many", "thumbs_up_rate": "high", "likert_mean": float("nan")}}
    ev = event(1, "canary", "policy-0008", stable="policy-0007", canary="policy-0008", evidence=bad)
    router.apply(ev)
    board.add(ev)
    canary = next(v for v in board.view(router, following=True).versions if v.role == "canary")
    assert canary.thumbs_up_rate is None and canary.thumbs == 0 and canary.likert_mean is None
    assert canary.thumbs_interval is None
