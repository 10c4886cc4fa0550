"""The governor's rule: pressure from the serving load, fewer rollouts at once below the threshold,
none at it (until the load falls to the resume fraction), the idle budget's duty cycle, and a load
that cannot be read (sampling as before)."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from prometheus_client import REGISTRY

from services.trainer.user_load import (
    GrpcLoadProbe,
    UserLoad,
    UserLoadGovernor,
    YieldSettings,
    idle_pause_s,
    rollout_concurrency,
    user_pressure,
)
from shared.kafka.embedded import free_port

SETTINGS = YieldSettings(
    user_in_flight=8,
    user_waiting=4,
    user_ttft_s=1.0,
    resume_fraction=0.5,
    poll_s=0.5,
    resume_after_s=0.0,  # at the first low read (the time hysteresis has its own test)
    idle_after_s=30,
    idle_budget=0.25,
)
BUSY = UserLoad(user_in_flight=8, user_quiet_s=0.0)
QUIET_USERS = UserLoad(user_in_flight=2, user_quiet_s=0.0)  # pressure 0.25
NOBODY = UserLoad(user_in_flight=0, user_quiet_s=60.0)


def test_pressure_is_the_largest_share_of_a_threshold():
    assert user_pressure(UserLoad(user_in_flight=4, user_waiting=1, user_ttft_p50_s=0.2), SETTINGS) == 0.5
    assert user_pressure(UserLoad(user_in_flight=1, user_waiting=3, user_ttft_p50_s=0.2), SETTINGS) == 0.75
    assert user_pressure(UserLoad(user_in_flight=1, user_waiting=0, user_ttft_p50_s=2.0), SETTINGS) == 2.0


def test_a_threshold_at_zero_is_not_a_criterion():
    off = YieldSettings(user_in_flight=0, user_waiting=0, user_ttft_s=0.0)
    assert user_pressure(UserLoad(user_in_flight=100, user_waiting=100, user_ttft_p50_s=9.0), off) == 0.0
    assert not YieldSettings(user_in_flight=0, user_waiting=0, user_ttft_s=0.0, idle_budget=1.0).enabled
    assert YieldSettings(user_in_flight=0, user_waiting=0, user_ttft_s=0.0, idle_budget=0.5).enabled


@pytest.mark.parametrize(
    ("pressure", "expected"),
    [(0.0, 16), (0.5, 16), (0.75, 8), (0.9, 4), (0.99, 1), (1.0, 0), (3.0, 0)],
)
def test_rollout_concurrency_falls_linearly_from_the_resume_level_to_the_threshold(pressure, expected):
    assert rollout_concurrency(pressure, 16, 0.5) == expected


def test_idle_pause_gives_the_budgets_share_of_wall_time():
    assert idle_pause_s(2.0, 0.25) == pytest.approx(6.0)  # 2 s of work in 8 s
    assert idle_pause_s(2.0, 1.0) == 0.0
    assert idle_pause_s(2.0, 0.0) == 0.0  # budget 0 never works while idle


def test_the_governor_yields_at_the_threshold_and_resumes_only_at_the_resume_fraction():
    g = UserLoadGovernor(SETTINGS, full=16)
    d = g.decide(BUSY, now=0.0)
    assert (d.state, d.concurrency, d.wait_s) == ("yielding", 0, 0.5)
    assert d.reason.startswith("yielding to users: 8 user requests in flight")
    # 6 in flight (0.75): below the threshold, but above the resume fraction: still yielding.
    assert g.decide(UserLoad(user_in_flight=6), now=1.0).state == "yielding"
    # 4 in flight (0.5): resume, at full concurrency.
    d = g.decide(UserLoad(user_in_flight=4), now=2.0)
    assert (d.state, d.concurrency) == ("full", 16)
    # Not yielding, 6 in flight: slowed (8 at once), not paused.
    d = g.decide(UserLoad(user_in_flight=6), now=3.0)
    assert (d.state, d.concurrency) == ("slowed", 8)


def test_a_slow_first_token_makes_it_yield_too():
    g = UserLoadGovernor(SETTINGS, full=16)
    assert g.decide(UserLoad(user_in_flight=1, user_ttft_p50_s=1.5), now=0.0).state == "yielding"
    assert g.decide(UserLoad(user_in_flight=1, user_waiting=4), now=0.0).state == "yielding"


def test_users_present_below_the_resume_level_get_no_idle_budget():
    g = UserLoadGovernor(SETTINGS, full=16)
    g.worked(10.0, now=100.0, idle=False)
    d = g.decide(QUIET_USERS, now=100.0)
    assert (d.state, d.concurrency) == ("full", 16)


def test_the_idle_budget_pauses_after_work_done_while_nobody_uses_the_system():
    g = UserLoadGovernor(SETTINGS, full=16)
    d = g.decide(NOBODY, now=0.0)
    assert (d.state, d.concurrency) == ("idle", 16)
    g.worked(2.0, now=2.0, idle=True)  # pause until 2 + 6
    d = g.decide(NOBODY, now=3.0)
    assert (d.state, d.concurrency, d.wait_s) == ("idle", 0, 0.5)
    assert "idle budget (25% of the time)" in d.reason
    assert g.decide(NOBODY, now=7.8).wait_s == pytest.approx(0.2)
    assert g.decide(NOBODY, now=8.0).concurrency == 16
    # A user comes back during the pause: it ends at once.
    g.worked(2.0, now=10.0, idle=True)
    assert g.decide(UserLoad(user_in_flight=1), now=11.0).concurrency == 16


def test_an_idle_budget_of_zero_waits_for_users_and_one_never_pauses():
    g = UserLoadGovernor(YieldSettings(idle_budget=0.0, idle_after_s=30), full=16)
    d = g.decide(NOBODY, now=0.0)
    assert (d.state, d.concurrency) == ("idle", 0)
    assert g.decide(UserLoad(user_in_flight=0, user_quiet_s=10.0), now=0.0).concurrency == 16  # not idle yet
    full = UserLoadGovernor(YieldSettings(idle_budget=1.0), full=16)
    full.worked(5.0, now=5.0, idle=True)
    assert full.decide(NOBODY, now=5.0).concurrency == 16


def test_an_unknown_load_samples_as_before_and_ends_a_yield():
    g = UserLoadGovernor(SETTINGS, full=16)
    assert g.decide(BUSY, now=0.0).state == "yielding"
    d = g.decide(None, now=1.0)
    assert (d.state, d.concurrency) == ("unknown", 16) and not g.yielding


def test_the_probe_reports_an_unreachable_inference_as_unknown_and_counts_it():
    def errors() -> float:
        return REGISTRY.get_sample_value("rlhf_trainer_user_load_errors_total", {"code": "UNAVAILABLE"}) or 0.0

    before = errors()
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        probe = GrpcLoadProbe(channel, timeout_s=2.0)
        assert probe.load() is None
        assert probe.load() is None
    assert errors() == before + 2


def test_at_the_default_thresholds_eight_streaming_clients_make_it_yield_and_four_users_do_not():
    from services.trainer.config import TrainerConfig
    from shared.config import load_config

    defaults = load_config(TrainerConfig, {}).yield_settings()
    eight = UserLoadGovernor(defaults, full=16)
    # a closed loop of 8 clients: 7-8 requests in flight at inference; it stays yielded while they stay
    assert [eight.decide(UserLoad(user_in_flight=k), now=0.0).state for k in (7, 8, 6, 5, 4)] == ["yielding"] * 5
    four = UserLoadGovernor(defaults, full=16)
    # the demo's four users: never a yield, at least two thirds of the rollouts at once
    decisions = [four.decide(UserLoad(user_in_flight=k), now=0.0) for k in (4, 3, 4)]
    assert all(d.state != "yielding" and d.concurrency >= 11 for d in decisions)


def test_a_yield_ends_only_after_the_load_stayed_low_for_resume_after_s():
    g = UserLoadGovernor(dataclasses.replace(SETTINGS, resume_after_s=2.0), full=16)
    assert g.decide(BUSY, now=0.0).state == "yielding"
    # a closed loop's dip to 3 in flight, then back up: the yield goes on
    assert g.decide(UserLoad(user_in_flight=3), now=1.0).state == "yielding"
    assert g.decide(UserLoad(user_in_flight=7), now=1.5).state == "yielding"
    assert g.decide(UserLoad(user_in_flight=3), now=2.0).state == "yielding"
    assert g.decide(UserLoad(user_in_flight=2), now=3.5).state == "yielding"  # low for 1.5 s
    d = g.decide(UserLoad(user_in_flight=0), now=4.0)  # low for 2 s: resume
    assert (d.state, d.concurrency) == ("full", 16)


def test_rollouts_in_flight_are_interrupted_exactly_at_the_yield_threshold():
    governor = UserLoadGovernor(SETTINGS, full=16)
    assert governor.interrupts(BUSY)  # 8 of 8 in flight: pressure 1
    assert governor.interrupts(UserLoad(user_in_flight=0, user_waiting=4))
    assert not governor.interrupts(UserLoad(user_in_flight=7, user_quiet_s=0.0))  # 0.875: slowed, not stopped
    assert not governor.interrupts(QUIET_USERS)
    assert not governor.interrupts(None)  # load unknown: as before, nothing is cancelled
