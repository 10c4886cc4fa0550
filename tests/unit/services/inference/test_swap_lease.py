"""The swap lease of a group of replicas: the taking rule, one holder at a time (also between
threads racing for it), an expired lease taken over, only the holder gives it back, an unreadable
record does not block swaps, and a replica that stops while waiting gives up."""

from __future__ import annotations

import threading
import time

import pytest

from services.inference.swap_lease import LeaseAbandoned, LeaseRecord, SwapLease, holder_id, may_take


def test_the_taking_rule():
    assert may_take(None, "a", 100.0)
    assert may_take(LeaseRecord("a", 200.0), "a", 100.0)  # its own: renewed
    assert not may_take(LeaseRecord("b", 200.0), "a", 100.0)
    assert may_take(LeaseRecord("b", 100.0), "a", 100.0)  # expired
    assert holder_id() != holder_id()


def test_one_holder_at_a_time_and_only_the_holder_gives_it_back(tmp_path):
    a = SwapLease(tmp_path, "policy.current", "a", ttl_s=60)
    b = SwapLease(tmp_path, "policy.current", "b", ttl_s=60)
    other_group = SwapLease(tmp_path, "policy.canary", "c", ttl_s=60)
    assert a.try_take() and not b.try_take()
    assert other_group.try_take(), "groups have leases of their own"
    b.release()  # not b's: nothing happens
    assert a.read().holder == "a" and not b.try_take()
    a.release()
    assert a.read() is None and b.try_take()
    assert (tmp_path / "policy.current.swap-lease").is_file()


def test_an_expired_lease_is_taken_over(tmp_path):
    now = [1000.0]
    dead = SwapLease(tmp_path, "policy.current", "dead", ttl_s=60, clock=lambda: now[0])
    alive = SwapLease(tmp_path, "policy.current", "alive", ttl_s=60, clock=lambda: now[0])
    assert dead.try_take()
    now[0] += 59.9
    assert not alive.try_take()
    now[0] += 0.1
    assert alive.try_take() and alive.read() == LeaseRecord("alive", 1060.0 + 60)


def test_an_unreadable_record_counts_as_free(tmp_path):
    lease = SwapLease(tmp_path, "policy.current", "a", ttl_s=60)
    lease.path.write_text("{not json")
    assert lease.try_take() and lease.read().holder == "a"


def test_racing_replicas_never_hold_the_lease_together(tmp_path):
    holding: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    done: list[str] = []

    def replica(name: str) -> None:
        lease = SwapLease(tmp_path, "policy.current", name, ttl_s=60)
        for _ in range(5):
            with lease.held(poll_s=0.001):
                holding.append(name)
                if len(holding) > 1:
                    overlaps.append(tuple(holding))
                time.sleep(0.002)
                holding.remove(name)
        done.append(name)

    threads = [threading.Thread(target=replica, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(done) == ["r0", "r1", "r2", "r3"] and overlaps == []


def test_held_waits_for_the_holder_and_gives_up_when_stopping(tmp_path):
    a = SwapLease(tmp_path, "policy.current", "a", ttl_s=60)
    b = SwapLease(tmp_path, "policy.current", "b", ttl_s=60)
    assert a.try_take()
    threading.Timer(0.3, a.release).start()
    with b.held(poll_s=0.01) as waited:
        assert waited >= 0.25 and b.read().holder == "b"
    assert b.read() is None, "given back after the block"
    assert a.try_take()
    stopping = threading.Event()
    threading.Timer(0.1, stopping.set).start()
    with pytest.raises(LeaseAbandoned), b.held(stopping, poll_s=0.01):
        pass


def test_a_lease_needs_a_positive_ttl(tmp_path):
    with pytest.raises(ValueError, match="ttl_s"):
        SwapLease(tmp_path, "policy.current", "a", ttl_s=0)
