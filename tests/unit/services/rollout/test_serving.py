"""RolloutServing on a real model store: authentic new candidates start canaries (the canary pointer
moved and announced, signed by the rollout service's key, after the step is durable), everything
else is ignored and counted; evidence counts only while a canary runs and since it started; the
gate's and the operators' decisions move the pointers; a restart from the emitted steps restores the
same state without moving anything and, on the same evidence, decides the same."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import pytest

from services.rollout import metrics
from services.rollout.evidence import GateSettings
from services.rollout.lifecycle import RolloutState
from services.rollout.pointers import LinePointers
from services.rollout.serving import CandidateCheck, RolloutServing, check_version_name, newest_version
from shared.errors import FailedPrecondition, InvalidArgument
from shared.events import (
    FeedbackEvent,
    PolicyCanaryEvent,
    PolicyCandidateEvent,
    PolicyUpdateEvent,
    RatedResponse,
    RolloutEvent,
)
from shared.kafka import envelope
from shared.kafka.topics import POLICY_CANARY, POLICY_UPDATES
from shared.model_store import ModelStore
from shared.signing import SigningKey, VerifyKeys
from shared.version_line import POLICY, POLICY_CANDIDATE, Announcement, VersionLine, VersionRefused


def keys_of(*keys: SigningKey) -> VerifyKeys:
    return VerifyKeys.load(values=",".join(base64.b64encode(k.public_raw).decode() for k in keys))


TRAINER_KEY = SigningKey.generate()
ROLLOUT_KEY = SigningKey.generate()
SETTINGS = GateSettings(alpha=0.05, margin=0.2, rho=5.0, min_ratings=20, timeout_s=600)


class Announcements:
    """A publisher recording what it sends (publish_and_wait), failing the first ``failures`` calls."""

    def __init__(self, log: list, failures: int = 0):
        self.log = log
        self.sent: list[tuple[str, object]] = []
        self.failures = failures

    def publish_and_wait(self, topic, payload, key=None):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker down")
        self.sent.append((topic, payload))
        self.log.append(("announce", topic, payload.version, payload.reason))


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class World:
    store: ModelStore
    candidates: VersionLine
    log: list
    steps: list
    announcements: Announcements
    clock: Clock

    def serving(self, history=None, failures: int = 0) -> RolloutServing:
        self.announcements.failures = failures
        pointers = LinePointers(self.store, self.announcements, signer=ROLLOUT_KEY)
        history = list(self.steps) if history is None else history
        state = RolloutState("policy-0001")
        for ev in history:
            state.apply(ev)

        def publish(ev: RolloutEvent) -> None:
            self.steps.append(ev)
            self.log.append(("step", ev.stage, ev.version))

        keys = keys_of(TRAINER_KEY)
        return RolloutServing(
            state,
            SETTINGS,
            canary_share=0.1,
            pointers=pointers,
            publish=publish,
            check=CandidateCheck(VersionLine(self.store, POLICY_CANDIDATE, keys=keys)),
            history=history,
            clock=self.clock,
            announce_owed=pointers.announce_owed,
        )

    def publish_candidate(self, src: Path) -> PolicyCandidateEvent:
        self.candidates.publish(src)
        return self.candidates.announce_pending()


class Recorder:
    def __init__(self) -> None:
        self.events: list = []

    def announce(self, event) -> None:
        self.events.append(event)


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 32)
    return d


@pytest.fixture()
def world(tmp_path: Path, src: Path) -> World:
    store = ModelStore(tmp_path / "models")
    VersionLine(store, POLICY, signer=TRAINER_KEY).publish(src)  # policy-0001, current, settled
    log: list = []
    return World(
        store,
        VersionLine(store, POLICY_CANDIDATE, Recorder(), signer=TRAINER_KEY),
        log,
        [],
        Announcements(log),
        Clock(),
    )


def feedback(i: int, version: str, up: bool, at: float) -> envelope.Envelope:
    ev = FeedbackEvent(
        feedback_id=f"f{i}", kind="thumb", user_id=f"u{i}", target=f"thumb:r{i}", revision=1, supersedes=None,
        responses=[RatedResponse(f"r{i}", version, "p")], thumb="up" if up else "down",
    )  # fmt: skip
    return dataclasses.replace(envelope.wrap(ev, "feedback"), produced_at=at)


def value(counter, *labels) -> float:
    return (counter.labels(*labels) if labels else counter)._value.get()


# --- candidates ------------------------------------------------------------------------------------


def test_restore_points_the_canary_group_at_stable_then_a_candidate_starts_a_canary(world, src):
    serving = world.serving()
    serving.restore()
    assert world.store.pointer("policy", "canary") == "policy-0001"
    assert world.log == [("announce", POLICY_CANARY, "policy-0001", "publish")]
    event = world.publish_candidate(src)
    [step] = serving.offer_candidate(event)
    assert (step.stage, step.version, step.canary, step.stable) == (
        "canary",
        "policy-0002",
        "policy-0002",
        "policy-0001",
    )
    assert step.evidence["candidate"]["announcement_sequence"] == 1
    # Durable first, then the pointer moved and announced (signed by the rollout service's key).
    assert world.log[1:] == [("step", "canary", "policy-0002"), ("announce", POLICY_CANARY, "policy-0002", "publish")]
    assert world.store.pointer("policy", "canary") == "policy-0002" and world.store.current("policy") == "policy-0001"
    _, announced = world.announcements.sent[-1]
    assert isinstance(announced, PolicyCanaryEvent) and announced.key_id == ROLLOUT_KEY.key_id
    assert serving.status().canary == "policy-0002" and serving.status().latest_candidate == "policy-0002"


def test_only_authentic_new_candidates_are_taken(world, src):
    serving = world.serving()
    serving.restore()
    first = world.publish_candidate(src)
    before = {r: value(metrics.CANDIDATES_IGNORED, r) for r in ("not_newer", "bad_signature", "rollback")}
    serving.offer_candidate(first)
    assert serving.offer_candidate(first) == []  # replayed: not newer
    # Signed by another key (not the trainer's).
    other = VersionLine(world.store, POLICY_CANDIDATE, Recorder(), signer=SigningKey.generate())
    other.publish(src)
    assert serving.offer_candidate(other.announce_pending()) == []
    # The trainer pointing its candidate back (it rebased): nothing new to try.
    world.candidates.set_current("policy-0002")
    back = world.candidates.announce_pending()
    assert back.reason == "rollback" and serving.offer_candidate(back) == []
    # A current-pointer announcement is not a candidate.
    assert serving.offer_candidate(PolicyUpdateEvent(version="policy-0003", manifest_sha256="x")) == []
    assert value(metrics.CANDIDATES_IGNORED, "not_newer") == before["not_newer"] + 1
    assert value(metrics.CANDIDATES_IGNORED, "bad_signature") == before["bad_signature"] + 1
    assert value(metrics.CANDIDATES_IGNORED, "rollback") == before["rollback"] + 1
    assert serving.state.canary == "policy-0002" and [s.stage for s in world.steps] == ["canary"]


def test_a_candidate_while_a_canary_runs_is_queued_and_starts_when_the_slot_frees(world, src):
    serving = world.serving()
    serving.restore()
    serving.offer_candidate(world.publish_candidate(src))
    [queued] = serving.offer_candidate(world.publish_candidate(src))
    assert (queued.stage, queued.version, serving.state.queued) == ("candidate", "policy-0003", "policy-0003")
    steps = serving.rollback("policy-0002")
    assert [(s.stage, s.version) for s in steps] == [("rolled_back", "policy-0002"), ("canary", "policy-0003")]
    assert world.store.pointer("policy", "canary") == "policy-0003"


# --- evidence and the gate -------------------------------------------------------------------------


def test_evidence_counts_only_while_a_canary_runs_and_since_it_started(world, src):
    serving = world.serving()
    serving.restore()
    serving.on_evidence(feedback(0, "policy-0001", True, world.clock.now))  # no canary: not counted
    serving.offer_candidate(world.publish_candidate(src))
    started = serving.state.canary_since
    serving.on_evidence(feedback(1, "policy-0002", True, started - 1))  # from before the canary
    serving.on_evidence(feedback(2, "policy-0002", True, started))
    serving.on_evidence(feedback(3, "policy-0001", False, started + 1))
    status = serving.status()
    assert status.canary_signals.summary["thumbs"] == 1 and status.canary_signals.summary["thumbs_up_rate"] == 1.0
    assert status.stable_signals.summary["thumbs"] == 1 and status.stable_signals.summary["thumbs_up_rate"] == 0.0


def rate(serving: RolloutServing, start: int, n: int, version: str, up_every: int, at: float) -> None:
    for i in range(start, start + n):
        serving.on_evidence(feedback(i, version, i % up_every == 0, at))


def test_a_worse_canary_is_rolled_back_and_the_canary_pointer_returns_to_stable_signed(world, src, tmp_path):
    serving = world.serving()
    serving.restore()
    serving.offer_candidate(world.publish_candidate(src))
    at = serving.state.canary_since
    rate(serving, 0, 40, "policy-0001", 1, at)  # stable: every thumb up
    rate(serving, 100, 40, "policy-0002", 1000, at)  # canary: (almost) every thumb down
    before = value(metrics.DECISIONS, "rollback", "gate")
    [step] = serving.tick()
    assert step.stage == "rolled_back" and "thumbs" in step.reason and step.evidence["thumbs"]["verdict"] == "rollback"
    assert value(metrics.DECISIONS, "rollback", "gate") == before + 1
    assert world.store.pointer("policy", "canary") == "policy-0001"
    topic, ended = world.announcements.sent[-1]
    assert (topic, ended.version, ended.reason) == (POLICY_CANARY, "policy-0001", "rollback")
    assert ended.key_id == ROLLOUT_KEY.key_id and world.store.current("policy") == "policy-0001"


def test_operators_promote_and_the_current_pointer_is_announced(world, src):
    serving = world.serving()
    serving.restore()
    serving.offer_candidate(world.publish_candidate(src))
    with pytest.raises(InvalidArgument, match="version"):
        serving.promote("policy-2")
    with pytest.raises(FailedPrecondition, match="not the canary"):
        serving.promote("policy-0001")
    [step] = serving.promote("policy-0002")
    assert step.stage == "promoted" and step.stable == "policy-0002" and step.canary == ""
    assert world.store.current("policy") == "policy-0002"
    topic, announced = world.announcements.sent[-1]
    assert topic == POLICY_UPDATES and (announced.version, announced.reason) == ("policy-0002", "publish")
    assert announced.key_id == ROLLOUT_KEY.key_id
    with pytest.raises(FailedPrecondition, match="no version is in canary"):
        serving.rollback("policy-0002")


def test_paused_and_manual_rollouts_report_the_verdict_without_acting(world, src):
    serving = world.serving()
    serving.restore()
    serving.offer_candidate(world.publish_candidate(src))
    at = serving.state.canary_since
    rate(serving, 0, 40, "policy-0001", 1, at)
    rate(serving, 100, 40, "policy-0002", 1000, at)
    assert [s.stage for s in serving.set_mode("manual")] == ["mode"]
    assert serving.tick() == [] and serving.status().last_verdict.action == "rollback"
    serving.set_mode("auto")
    serving.pause()
    assert serving.tick() == [] and serving.state.canary == "policy-0002"
    serving.resume()
    assert [s.stage for s in serving.tick()] == ["rolled_back"]


def test_a_restart_restores_the_same_state_moves_nothing_and_decides_the_same(world, src):
    serving = world.serving()
    serving.restore()
    serving.offer_candidate(world.publish_candidate(src))
    at = serving.state.canary_since
    evidence = [feedback(i, "policy-0001", True, at) for i in range(40)]
    evidence += [feedback(100 + i, "policy-0002", i % 50 == 0, at + 1) for i in range(40)]
    sent, steps = len(world.announcements.sent), list(world.steps)
    # Killed mid-canary: a new service from the steps on the topic.
    again = world.serving(history=steps)
    again.restore()
    assert len(world.announcements.sent) == sent  # the pointers are where the steps say: nothing moved
    assert (again.state.canary, again.state.canary_since, again.state.sequence) == ("policy-0002", at, 1)
    for env in evidence:
        serving.on_evidence(env)
        again.on_evidence(env)
    world.clock.now += 10
    [decided] = serving.tick()
    [decided_again] = again.tick()
    assert (
        (decided.stage, decided.reason)
        == (decided_again.stage, decided_again.reason)
        == (
            "rolled_back",
            "worse than the stable version on thumbs",
        )
    )
    assert decided.evidence["thumbs"] == decided_again.evidence["thumbs"]
    assert decided.sequence == decided_again.sequence == 2


def test_a_pointer_announcement_kafka_refused_is_retried_on_the_next_tick(world, src):
    serving = world.serving(failures=2)
    serving.restore()  # the canary pointer moves; its announcement fails, and again when retried: owed
    assert world.announcements.sent == [] and value(metrics.POINTERS_OWED) == 1
    serving.tick()
    assert [(t, e.version) for t, e in world.announcements.sent] == [(POLICY_CANARY, "policy-0001")]
    assert value(metrics.POINTERS_OWED) == 0


# --- pure rules ------------------------------------------------------------------------------------


def test_newest_version_is_the_highest_any_step_names():
    steps = [
        RolloutEvent(1, "policy-0004", "canary", "", "policy-0002", "policy-0004", 0.1, False, "auto"),
        RolloutEvent(2, "policy-0004", "rolled_back", "", "policy-0002", "", 0.0, False, "auto", queued="policy-0007"),
    ]
    assert newest_version(steps, "policy-0002") == 7
    assert newest_version([], "policy-0003") == 3


@pytest.mark.parametrize("bad", ["", "policy-2", "rm-0001", "policy-0001/..", "../policy-0001"])
def test_check_version_name_refuses_anything_but_a_policy_version(bad):
    with pytest.raises(InvalidArgument) as err:
        check_version_name(bad)
    assert err.value.param == "version"
    assert check_version_name("policy-0012") == "policy-0012"


def test_candidate_check_reads_the_stores_record_as_an_event(world, src):
    check = CandidateCheck(VersionLine(world.store, POLICY_CANDIDATE, keys=keys_of(TRAINER_KEY)))
    assert check.recorded() is None
    world.publish_candidate(src)
    version, evidence = check(check.recorded())
    assert version == "policy-0002" and evidence["candidate"]["parent"] == ""
    # A record whose manifest changed since it was announced is refused.
    a = Announcement("policy.candidate", "policy-0002", "0" * 64, "publish", 9).signed_by(TRAINER_KEY)
    with pytest.raises(VersionRefused) as err:
        check(POLICY_CANDIDATE.make_event(a, None, {}))
    assert err.value.reason == "manifest_mismatch"
