"""The load counts by source: in flight, waiting for a first token, recent user TTFT, how long users
have been quiet; each ticket counts once however its request ends."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.inference.load import LoadTracker, median


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_median():
    assert median([]) == 0.0
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_requests_are_counted_by_source_until_their_first_token_and_their_end():
    clock = Clock()
    load = LoadTracker(clock=clock)
    user = load.enter("user", arrived_at=100.0)
    rollout = load.enter("trainer", arrived_at=100.0)
    clock.now = 100.0 + load.waiting_after_s
    s = load.snapshot()
    assert (s.user_in_flight, s.user_waiting, s.trainer_in_flight, s.trainer_waiting) == (1, 1, 1, 1)
    assert s.user_requests == 1 and s.user_quiet_s == 0.0
    assert REGISTRY.get_sample_value("rlhf_inference_in_flight_by_source", {"source": "user"}) == 1
    user.first_token(100.3)
    user.first_token(100.4)  # counted once
    s = load.snapshot()
    assert (s.user_in_flight, s.user_waiting) == (1, 0)
    assert s.user_ttft_p50_s == pytest.approx(0.3) and s.user_ttft_samples == 1
    user.leave()
    user.leave()  # counted once
    rollout.leave()  # ended before its first token (aborted): no longer waiting either
    s = load.snapshot()
    assert (s.user_in_flight, s.user_waiting, s.trainer_in_flight, s.trainer_waiting) == (0, 0, 0, 0)
    assert REGISTRY.get_sample_value("rlhf_inference_waiting_first_token", {"source": "trainer"}) == 0


def test_the_ttft_median_covers_the_window_only_and_trainer_ttfts_are_not_users():
    clock = Clock()
    load = LoadTracker(ttft_window_s=10.0, clock=clock)
    for ttft in (0.1, 0.2, 0.9):
        t = load.enter("user", arrived_at=clock.now)
        clock.now += ttft
        t.first_token(clock.now)
        t.leave()
    rollout = load.enter("trainer", arrived_at=clock.now)
    rollout.first_token(clock.now + 5.0)
    assert load.snapshot().user_ttft_p50_s == pytest.approx(0.2)
    clock.now += 11.0
    s = load.snapshot()
    assert (s.user_ttft_p50_s, s.user_ttft_samples) == (0.0, 0)


def test_the_ttft_ring_is_bounded():
    clock = Clock()
    load = LoadTracker(ttft_kept=4, clock=clock)
    for _ in range(10):
        load.enter("user", arrived_at=clock.now).first_token(clock.now + 1.0)
    assert len(load.user_ttfts) == 4


def test_users_are_quiet_since_the_last_user_request_ended_or_since_the_start():
    clock = Clock()
    load = LoadTracker(clock=clock)
    clock.now += 5.0
    assert load.snapshot().user_quiet_s == 5.0
    t = load.enter("user", arrived_at=clock.now)
    clock.now += 3.0
    assert load.snapshot().user_quiet_s == 0.0
    t.leave()
    clock.now += 2.0
    load.enter("trainer", arrived_at=clock.now)  # rollouts do not count as users
    assert load.snapshot().user_quiet_s == 2.0


def test_an_unknown_source_is_refused():
    with pytest.raises(ValueError, match="unknown source 'robot'"):
        LoadTracker().enter("robot", arrived_at=0.0)


def test_a_user_request_counts_as_waiting_only_once_it_has_waited_a_while():
    """A closed loop of users has every request "before its first token" for a few milliseconds:
    that is not queueing. Only a request that has waited ``waiting_after_s`` counts (GetLoad's
    user_waiting, which makes the trainer yield)."""
    clock = Clock()
    load = LoadTracker(clock=clock, waiting_after_s=0.25)
    just_sent = [load.enter("user", arrived_at=100.0) for _ in range(4)]
    assert load.snapshot().user_waiting == 0 and load.snapshot().user_in_flight == 4
    clock.now = 100.2
    late = load.enter("user", arrived_at=100.2)
    assert load.snapshot().user_waiting == 0
    clock.now = 100.3  # the first four have waited 0.3 s, the fifth 0.1 s
    assert load.snapshot().user_waiting == 4
    just_sent[0].first_token(100.3)
    just_sent[1].leave()
    assert load.snapshot().user_waiting == 2
    clock.now = 101.0
    assert load.snapshot().user_waiting == 3  # the fifth too now
    for t in [*just_sent, late]:
        t.leave()
    assert load.snapshot().user_waiting == 0 and not load.user_before_first  # nothing left behind
