"""The assignment rule and the router: the split matches the share over many principals, a
conversation keeps its version while a canary runs, raising the share only adds to the canary, each
canary draws afresh, and without a canary group nothing goes to a canary."""

from __future__ import annotations

import math

import pytest

from services.gateway.rollout.routing import (
    CANARY,
    STABLE,
    Route,
    Router,
    RoutingState,
    assignment_point,
    in_canary,
)
from shared.events import RolloutEvent


def event(
    sequence: int, stage: str = "canary", *, stable="policy-0007", canary="policy-0008", share=0.1
) -> RolloutEvent:
    return RolloutEvent(
        sequence=sequence,
        version=canary or stable,
        stage=stage,
        reason="test",
        stable=stable,
        canary=canary,
        canary_share=share if canary else 0.0,
        paused=False,
        mode="auto",
        at=1000.0 + sequence,
    )


def test_the_assignment_point_is_the_hash_rule_of_the_docstring():
    import hashlib

    digest = hashlib.sha256(b"policy-0008\0alice\0conv-1").digest()
    assert assignment_point("policy-0008", "alice", "conv-1") == int.from_bytes(digest[:8], "big") / 2**64
    # without a conversation id the principal stands in for it
    assert assignment_point("policy-0008", "alice", None) == assignment_point("policy-0008", "alice", "alice")
    assert 0 <= assignment_point("c", "p", "x") < 1


@pytest.mark.parametrize("share", [0.05, 0.1, 0.5])
def test_the_split_matches_the_share_within_the_binomial_error_over_many_principals(share):
    n = 20_000
    hits = sum(in_canary("policy-0008", share, f"user-{i}", None) for i in range(n))
    tolerance = 4 * math.sqrt(share * (1 - share) / n)  # 4 standard errors: fails by chance ~1 in 16000
    assert abs(hits / n - share) < tolerance


def test_the_split_holds_over_conversations_of_one_principal_too():
    n = 20_000
    hits = sum(in_canary("policy-0008", 0.2, "alice", f"conv-{i}") for i in range(n))
    assert abs(hits / n - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)


def test_a_conversation_keeps_its_version_while_the_canary_runs():
    router = Router(canary_enabled=True)
    router.apply(event(1))
    conversations = [(f"user-{i % 37}", f"conv-{i}") for i in range(2000)]
    first = {c: router.route(*c) for c in conversations}
    assert {r.group for r in first.values()} == {STABLE, CANARY}
    # operator steps that change no routing (pause, resume, mode) and repeated reads keep every route
    router.apply(event(2, "paused"))
    router.apply(event(3, "mode"))
    for _ in range(3):
        assert {c: router.route(*c) for c in conversations} == first


def test_raising_the_share_only_moves_conversations_into_the_canary():
    keys = [(f"user-{i}", None) for i in range(5000)]
    low = {k for k in keys if in_canary("policy-0008", 0.05, *k)}
    high = {k for k in keys if in_canary("policy-0008", 0.2, *k)}
    assert low < high


def test_each_canary_draws_its_own_users():
    keys = [f"user-{i}" for i in range(20_000)]
    a = {k for k in keys if in_canary("policy-0008", 0.1, k, None)}
    b = {k for k in keys if in_canary("policy-0009", 0.1, k, None)}
    overlap = len(a & b) / len(keys)
    assert abs(overlap - 0.01) < 0.005, "independent draws overlap in about share^2 of the users"


def test_no_canary_no_share_or_no_canary_group_routes_everything_to_stable():
    assert not in_canary("", 0.5, "alice", None)
    assert not in_canary("policy-0008", 0.0, "alice", None)
    assert in_canary("policy-0008", 1.0, "alice", None)
    off = Router(canary_enabled=False)
    off.apply(event(1, share=1.0))
    assert off.route("alice", None) == Route(STABLE, "policy-0007") and off.canary_share == 0.0


def test_the_router_follows_the_latest_event_canary_start_promotion_rollback():
    router = Router(canary_enabled=True)
    assert router.route("alice", None) == Route(STABLE, "")  # before any event: the stable group
    assert router.apply(event(1, share=1.0)) is True
    assert router.route("alice", None) == Route(CANARY, "policy-0008") and router.canary_share == 1.0
    assert router.apply(event(2, "paused", share=1.0)) is False  # paused: the canary keeps its traffic
    assert router.route("alice", None).group == CANARY
    assert router.apply(event(3, "promoted", stable="policy-0008", canary="")) is True
    assert router.route("alice", None) == Route(STABLE, "policy-0008") and router.canary_share == 0.0
    router.apply(event(4, canary="policy-0009", stable="policy-0008", share=1.0))
    router.apply(event(5, "rolled_back", stable="policy-0008", canary=""))
    assert router.route("alice", "c") == Route(STABLE, "policy-0008")


def test_a_restarted_controller_counting_from_one_again_is_still_followed():
    router = Router(canary_enabled=True)
    router.apply(event(40, share=1.0))
    router.apply(event(1, "rolled_back", canary=""))  # the topic was recreated: order, not numbers
    assert router.route("alice", None) == Route(STABLE, "policy-0007")


def test_a_share_outside_0_1_is_clamped_and_no_canary_means_no_share():
    assert RoutingState.of(event(1, share=7.0)).canary_share == 1.0
    assert RoutingState.of(event(1, share=-1.0)).canary_share == 0.0
    assert RoutingState.of(event(1, canary="", share=0.5)).canary_share == 0.0


def test_routed_counts_start_again_with_each_canary():
    router = Router(canary_enabled=True)
    router.apply(event(1))
    router.count(STABLE)
    router.count(CANARY)
    router.count("side_by_side")
    router.apply(event(2, "paused"))
    assert router.routed == {STABLE: 1, CANARY: 1, "side_by_side": 1, "canary_fallback": 0}
    router.apply(event(3, "rolled_back", canary=""))
    assert router.routed == {STABLE: 0, CANARY: 0, "side_by_side": 0, "canary_fallback": 0}
