"""The rollout controller with recording stand-ins for Kafka and the pointers: steps are emitted
before they are acted on, the live gate rolls a worse canary back and promotes a good one, and a
restart restores the pointers from the state the events left."""

from __future__ import annotations

import pytest

from services.rollout.controller import RolloutController
from services.rollout.evidence import EvidenceBook, GateSettings
from services.rollout.lifecycle import Lifecycle, RolloutState
from shared.events import FeedbackEvent, RatedResponse


class Pointers:
    def __init__(self, log: list):
        self.log = log

    def serve_canary(self, version: str) -> None:
        self.log.append(("canary", version))

    def serve_stable(self, version: str) -> None:
        self.log.append(("stable", version))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SETTINGS = GateSettings(min_ratings=20, timeout_s=600)


def make(settings: GateSettings = SETTINGS):
    log: list = []
    emitted: list = []

    def emit(ev):
        emitted.append(ev)
        log.append(("event", ev.stage, ev.version))

    clock = Clock()
    c = RolloutController(Lifecycle(RolloutState("policy-0001"), 0.1), EvidenceBook(), settings, Pointers(log), emit,
                          clock)  # fmt: skip
    return c, log, emitted, clock


def thumb(i: int, version: str, up: bool) -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=f"f{i}", kind="thumb", user_id=f"u{i}", target=f"thumb:r{i}", revision=1, supersedes=None,
        responses=[RatedResponse(f"r{i}", version, "p")], thumb="up" if up else "down",
    )  # fmt: skip


def test_a_candidate_is_emitted_then_served_by_the_canary_group():
    c, log, _, _ = make()
    c.on_candidate("policy-0002")
    assert log == [("event", "canary", "policy-0002"), ("canary", "policy-0002")]
    assert c.book.watched == {"policy-0001", "policy-0002"}


def test_a_worse_canary_is_rolled_back_and_its_traffic_returns_to_stable():
    c, log, _, _ = make()
    c.on_candidate("policy-0002")
    for i in range(400):
        c.on_feedback(thumb(i, "policy-0001", up=i % 10 < 8))
    for i in range(400, 460):
        c.on_feedback(thumb(i, "policy-0002", up=i % 10 < 2))
    [ev] = c.tick()
    assert ev.stage == "rolled_back" and "thumbs" in ev.reason and ev.evidence["thumbs"]["verdict"] == "rollback"
    assert log[-1] == ("canary", "policy-0001") and c.state.canary == ""


def test_a_good_canary_is_promoted_and_served_everywhere():
    c, log, _, _ = make()
    c.on_candidate("policy-0002")
    for i in range(300):
        c.on_feedback(thumb(i, "policy-0001", up=i % 2 == 0))
    for i in range(300, 900):
        c.on_feedback(thumb(i, "policy-0002", up=i % 10 < 9))
    [ev] = c.tick()
    assert ev.stage == "promoted" and log[-2:] == [("stable", "policy-0002"), ("canary", "policy-0002")]


def test_a_canary_without_evidence_times_out():
    c, _, _, clock = make()
    c.on_candidate("policy-0002")
    assert c.tick() == []
    clock.now += 601
    [ev] = c.tick()
    assert ev.stage == "rolled_back" and "no conclusion" in ev.reason


def test_nothing_is_acted_on_when_emitting_fails():
    c, log, _, _ = make()

    def broken(ev):
        raise ConnectionError("broker down")

    c.emit = broken
    with pytest.raises(ConnectionError):
        c.on_candidate("policy-0002")
    assert log == []


def test_a_restarted_controller_restores_the_pointers_from_the_events():
    c, _, emitted, _ = make()
    c.on_candidate("policy-0002")
    log: list = []
    restarted = RolloutController(
        Lifecycle(RolloutState.rebuilt("policy-0001", emitted), 0.1), EvidenceBook(), GateSettings(),
        Pointers(log), lambda ev: None,
    )  # fmt: skip
    restarted.restore()
    assert log == [("stable", "policy-0001"), ("canary", "policy-0002")]
    assert restarted.book.watched == {"policy-0001", "policy-0002"}


def test_each_canary_is_judged_on_the_evidence_since_it_started():
    c, _, emitted, _ = make()
    c.on_candidate("policy-0002", {"candidate": {"parent": "policy-0001"}})
    assert emitted[-1].evidence == {"candidate": {"parent": "policy-0001"}}
    for i in range(30):
        c.on_feedback(thumb(i, "policy-0001", up=True))
    c.rollback("policy-0002")
    # The stable version's ratings from the last canary period do not count for the next one.
    c.on_candidate("policy-0003")
    assert c.book.of("policy-0001").thumbs.n == 0 and c.book.watched == {"policy-0001", "policy-0003"}
