"""Token buckets per principal: the refill and wait rules, one bucket per principal, a bounded LRU map
whose size and evictions are in the metrics."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.gateway.rate_limit import TokenBuckets, refill, retry_after_header, wait_for_token


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_refill_adds_rate_times_elapsed_up_to_the_burst():
    assert refill(0.0, 2.0, 0.5, 10) == 1.0
    assert refill(9.5, 10.0, 1.0, 10) == 10
    assert refill(3.0, -5.0, 1.0, 10) == 3.0  # a clock going backwards adds nothing


def test_wait_is_the_time_to_one_token_and_retry_after_rounds_it_up():
    assert wait_for_token(0.25, 0.5) == pytest.approx(1.5)
    assert wait_for_token(1.0, 0.5) == 0.0
    assert [retry_after_header(w) for w in (0.0, 0.01, 1.0, 1.2, 59.9)] == ["1", "1", "1", "2", "60"]


def test_a_principal_gets_its_burst_then_one_per_refill_interval():
    buckets = TokenBuckets("t-burst", rate_per_min=60, burst=3, max_principals=10)
    assert [buckets.take("alice", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("alice", now=100.0) == pytest.approx(1.0)  # refused: one token a second
    assert buckets.take("alice", now=100.5) == pytest.approx(0.5)  # a refusal takes nothing
    assert buckets.take("alice", now=101.0) == 0.0
    assert buckets.take("bob", now=101.0) == 0.0, "each principal has its own bucket"
    assert sample("rlhf_gateway_rate_limit_total", limit="t-burst", outcome="allowed") == 5
    assert sample("rlhf_gateway_rate_limit_total", limit="t-burst", outcome="refused") == 2


def test_the_map_keeps_the_most_recent_principals_only():
    buckets = TokenBuckets("t-lru", rate_per_min=1, burst=1, max_principals=2)
    buckets.take("alice", now=0.0)
    buckets.take("bob", now=0.0)
    assert buckets.take("alice", now=0.0) > 0  # alice is now the most recent
    buckets.take("carol", now=0.0)  # pushes out bob, the least recently seen
    assert len(buckets) == 2
    assert sample("rlhf_gateway_rate_limit_evictions_total", limit="t-lru") == 1
    assert sample("rlhf_gateway_rate_limit_principals", limit="t-lru") == 2
    assert buckets.take("alice", now=0.0) > 0, "a principal that keeps sending is never pushed out"
    assert buckets.take("bob", now=0.0) == 0.0  # bob starts again with a full bucket


def test_a_rate_of_zero_turns_the_limit_off():
    buckets = TokenBuckets("t-off", rate_per_min=0, burst=1, max_principals=1)
    assert not buckets.enabled
    assert all(buckets.take("alice", now=0.0) == 0.0 for _ in range(100)) and len(buckets) == 0
