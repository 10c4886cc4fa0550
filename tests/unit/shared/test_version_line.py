"""The version line: publish -> announcement owed (durable in the store) -> announced; rollbacks;
offline lines; and the follower's verification before a swap."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from shared.events import PolicyUpdateEvent, RewardModelEvent
from shared.kafka.topics import POLICY_UPDATES
from shared.model_store import ModelStore
from shared.version_line import (
    POLICY,
    REWARD_MODEL,
    KafkaAnnouncer,
    PendingAnnouncement,
    VerifiedVersion,
    VersionFollower,
    VersionLine,
)


class RecordingAnnouncer:
    def __init__(self, failures: int = 0):
        self.events: list = []
        self.failures = failures

    def announce(self, event) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker down")
        self.events.append(event)


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_a_publish_is_owed_until_kafka_acknowledges_it(store, src):
    announcer = RecordingAnnouncer()
    line = VersionLine(store, POLICY, announcer)
    manifest = line.publish(src, metrics={"kl": 0.5})
    assert line.pending_announcement() == PendingAnnouncement(manifest.version, "publish")
    event = line.announce_pending()
    assert announcer.events == [event] and isinstance(event, PolicyUpdateEvent)
    assert (event.version, event.reason, event.metrics) == ("policy-0001", "publish", {"kl": 0.5})
    assert event.manifest_sha256 == store.manifest_sha256("policy-0001")
    assert line.pending_announcement() is None and line.announced() == "policy-0001"
    assert line.announce_pending() is None and len(announcer.events) == 1  # nothing owed: nothing sent


def test_a_failed_announcement_stays_owed_across_a_restart(store, src):
    line = VersionLine(store, REWARD_MODEL, RecordingAnnouncer(failures=1))
    line.publish(src)
    assert line.announce_pending() is None  # Kafka refused it
    assert line.pending_announcement() == PendingAnnouncement("rm-0001", "publish")
    # A new process on the same store (the publisher restarted) owes the same and pays it.
    restarted = VersionLine(store, REWARD_MODEL, RecordingAnnouncer())
    event = restarted.announce_pending()
    assert isinstance(event, RewardModelEvent) and event.version == "rm-0001"
    assert line.pending_announcement() is None


def test_a_rollback_is_announced_as_one_and_a_roll_forward_as_a_publish(store, src):
    announcer = RecordingAnnouncer()
    line = VersionLine(store, POLICY, announcer)
    for _ in range(3):
        line.publish(src)
        line.announce_pending()
    line.set_current("policy-0001")
    assert line.pending_announcement() == PendingAnnouncement("policy-0001", "rollback")
    assert line.announce_pending().reason == "rollback"
    line.set_current("policy-0003")
    assert line.announce_pending().reason == "publish"
    # Back to the version last announced before the announcement went out: nothing is owed.
    line.set_current("policy-0002")
    line.set_current("policy-0003")
    assert line.pending_announcement() is None
    assert [e.version for e in announcer.events] == ["policy-0001", "policy-0002", "policy-0003", "policy-0001",
                                                     "policy-0003"]  # fmt: skip


def test_an_offline_line_owes_nothing(store, src):
    line = VersionLine(store, POLICY)  # rlhf bootstrap, rlhf train-rm: no Kafka
    line.publish(src)
    assert line.pending_announcement() is None and line.announced() == "policy-0001"
    line.publish(src, make_current=False)
    assert line.pending_announcement() is None and store.current("policy") == "policy-0001"


def test_kafka_announcer_uses_the_lines_topic_and_key():
    sent = []

    class Publisher:
        def publish_and_wait(self, topic, payload, key=None):
            sent.append((topic, payload, key))

    KafkaAnnouncer(Publisher(), POLICY).announce("event")
    assert sent == [(POLICY_UPDATES, "event", "policy")]


# --- following -----------------------------------------------------------------------------------


class Replica:
    """What a service gives its follower: the version it serves and a swap that records."""

    def __init__(self, serving: str = ""):
        self.serving = serving
        self.swapped: list[VerifiedVersion] = []

    def swap(self, verified: VerifiedVersion) -> bool:
        self.swapped.append(verified)
        self.serving = verified.version
        return True


def follower_for(store, replica, check=None, kind=POLICY):
    refused = Counter("refused", "refused versions", ["reason"], registry=CollectorRegistry())
    follower = VersionFollower(
        VersionLine(store, kind), serving=lambda: replica.serving, swap=replica.swap, refused=refused, check=check
    )
    return follower, refused


def count(counter, reason: str) -> float:
    return counter.labels(reason)._value.get()


def announcement(store, version, sha=None, reason="publish"):
    return PolicyUpdateEvent(version=version, manifest_sha256=sha or store.manifest_sha256(version), reason=reason)


def test_a_verified_announcement_is_swapped_in(store, src):
    VersionLine(store, POLICY).publish(src)
    replica = Replica()
    follower, _ = follower_for(store, replica)
    assert follower.accept(announcement(store, "policy-0001"))
    [verified] = replica.swapped
    assert verified.version == "policy-0001" and verified.path == store.path("policy-0001")
    assert verified.manifest_sha256 == store.manifest_sha256("policy-0001") and verified.reason == "publish"
    # The version served already: ignored, not counted as a refusal.
    assert follower.accept(announcement(store, "policy-0001")) is False and follower.refusals == 0


def test_announcements_that_do_not_verify_are_refused_and_counted(store, src, tmp_path):
    line = VersionLine(store, POLICY)
    line.publish(src)
    line.publish(src)
    replica = Replica("policy-0001")
    follower, refused = follower_for(store, replica)
    assert not follower.accept(announcement(store, "policy-0002", sha="0" * 64))
    assert count(refused, "manifest_mismatch") == 1
    assert not follower.accept(RewardModelEvent(version="policy-0002", manifest_sha256="x"))
    assert count(refused, "wrong_event") == 1
    assert not follower.accept(PolicyUpdateEvent(version="rm-0001", manifest_sha256="x"))
    assert not follower.accept(PolicyUpdateEvent(version="policy-12\n", manifest_sha256="x"))
    assert count(refused, "wrong_line") == 2
    assert not follower.accept(PolicyUpdateEvent("policy-0009", "x"))
    assert count(refused, "UnknownVersionError") == 1
    sha = store.manifest_sha256("policy-0002")
    weights = store.path("policy-0002") / "model.safetensors"
    weights.write_bytes(b"\1" * 64)  # changed after publication
    assert not follower.accept(announcement(store, "policy-0002", sha=sha))
    assert count(refused, "CorruptVersionError") == 1
    assert replica.swapped == [] and replica.serving == "policy-0001" and follower.refusals == 6


def test_the_services_check_can_refuse_a_verified_version(store, src):
    VersionLine(store, POLICY).publish(src)

    class Incompatible(ValueError):
        pass

    def check(verified):
        raise Incompatible(f"{verified.version} does not fit")

    replica = Replica()
    follower, refused = follower_for(store, replica, check=check)
    assert not follower.accept(announcement(store, "policy-0001"))
    assert count(refused, "Incompatible") == 1 and replica.swapped == []


def test_a_follower_reads_the_versions_from_its_own_store(store, src, tmp_path):
    # A replica with its own mount of the same files verifies and swaps in its own copy.
    VersionLine(store, REWARD_MODEL).publish(src)
    mirror = tmp_path / "mirror"
    shutil.copytree(store.root, mirror)
    replica = Replica()
    follower, _ = follower_for(ModelStore(mirror), replica, kind=REWARD_MODEL)
    event = RewardModelEvent(version="rm-0001", manifest_sha256=store.manifest_sha256("rm-0001"))
    assert follower.accept(event) and replica.swapped[0].path == mirror / "rm-0001"
