"""The version line: publish (signed) -> announcement owed (durable in the store) -> announced
(signed, numbered); rollbacks; offline lines; and the follower: authentication, replays, steps
back, verification into a private copy, restarts."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import blake3
import pytest
from prometheus_client import CollectorRegistry, Counter

from shared.events import PolicyCanaryEvent, PolicyCandidateEvent, PolicyUpdateEvent, RewardModelEvent
from shared.kafka import topics
from shared.kafka.topics import POLICY_CANDIDATES, POLICY_UPDATES
from shared.model_store import ModelStore
from shared.signing import SigningKey
from shared.version_copies import PrivateCopies
from shared.version_line import (
    POLICY,
    POLICY_CANARY,
    POLICY_CANDIDATE,
    POLICY_KINDS,
    REWARD_MODEL,
    Announcement,
    KafkaAnnouncer,
    PendingAnnouncement,
    VerifiedVersion,
    VersionFollower,
    VersionLine,
    VersionRefused,
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


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


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


def publisher(store, key, kind=POLICY, announcer=None) -> VersionLine:
    return VersionLine(store, kind, announcer if announcer is not None else RecordingAnnouncer(), signer=key)


# --- publishing ----------------------------------------------------------------------------------


def test_a_publish_is_signed_and_owed_until_kafka_acknowledges_it(store, src, key):
    announcer = RecordingAnnouncer()
    line = publisher(store, key, announcer=announcer)
    manifest = line.publish(src, metrics={"kl": 0.5})
    assert json.loads(store.read_manifest(manifest.version).signature)["key_id"] == key.key_id
    assert line.pending_announcement() == PendingAnnouncement(manifest.version, "publish")
    event = line.announce_pending()
    assert announcer.events == [event] and isinstance(event, PolicyUpdateEvent)
    assert (event.version, event.reason, event.metrics, event.sequence) == ("policy-0001", "publish", {"kl": 0.5}, 1)
    assert event.manifest_sha256 == store.manifest_sha256("policy-0001") and event.key_id == key.key_id
    key.verify_keys().verify(POLICY.announcement(event).message(), POLICY.announcement(event).signature_doc())
    assert line.pending_announcement() is None and line.announced() == "policy-0001"
    assert line.announce_pending() is None and len(announcer.events) == 1  # nothing owed: nothing sent


def test_a_failed_announcement_stays_owed_across_a_restart_with_its_number(store, src, key):
    line = publisher(store, key, REWARD_MODEL, RecordingAnnouncer(failures=1))
    line.publish(src)
    assert line.announce_pending() is None  # Kafka refused it
    assert line.pending_announcement() == PendingAnnouncement("rm-0001", "publish")
    # The record holds the announcement (written before sending), not yet acknowledged.
    assert line.last_announcement() is not None and line.last_announcement()[1] is False
    # A new process on the same store (the publisher restarted) owes the same and pays it, with
    # the same sequence number: a follower that did get the first send ignores the second.
    restarted = publisher(store, key, REWARD_MODEL)
    event = restarted.announce_pending()
    assert isinstance(event, RewardModelEvent) and (event.version, event.sequence) == ("rm-0001", 1)
    assert line.pending_announcement() is None
    # The same after an acknowledged one: the next publish fails, stays owed, goes out as number 2.
    failing = publisher(store, key, REWARD_MODEL, RecordingAnnouncer(failures=1))
    failing.publish(src)
    assert failing.announce_pending() is None
    assert failing.pending_announcement() == PendingAnnouncement("rm-0002", "publish")
    assert (failing.announce_pending().sequence, failing.pending_announcement()) == (2, None)


def test_a_rollback_is_announced_as_one_and_a_roll_forward_as_a_publish(store, src, key):
    announcer = RecordingAnnouncer()
    line = publisher(store, key, announcer=announcer)
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
    assert [(e.version, e.sequence) for e in announcer.events] == [
        ("policy-0001", 1),
        ("policy-0002", 2),
        ("policy-0003", 3),
        ("policy-0001", 4),
        ("policy-0003", 5),
    ]


def test_an_offline_line_owes_nothing_and_records_a_signed_announcement(store, src, key):
    line = VersionLine(store, POLICY, signer=key)  # rlhf bootstrap, rlhf train-rm: no Kafka
    line.publish(src)
    assert line.pending_announcement() is None and line.announced() == "policy-0001"
    record, acked = line.last_announcement()
    assert acked and record.sequence == 1 and record.key_id == key.key_id
    line.publish(src, make_current=False)
    assert line.pending_announcement() is None and store.current("policy") == "policy-0001"
    line.set_current("policy-0002")
    assert line.last_announcement()[0].sequence == 2


def test_kafka_announcer_uses_the_lines_topic_and_key():
    sent = []

    class Publisher:
        def publish_and_wait(self, topic, payload, key=None):
            sent.append((topic, payload, key))

    KafkaAnnouncer(Publisher(), POLICY).announce("event")
    assert sent == [(POLICY_UPDATES, "event", "policy")]


def test_sign_unsigned_adopts_a_store_made_before_signing(store, src, key):
    VersionLine(store, POLICY).publish(src)  # unsigned, unsigned record
    VersionLine(store, POLICY).publish(src)
    line = VersionLine(store, POLICY, signer=key)
    assert line.sign_unsigned() == ["policy-0001", "policy-0002"]
    assert line.sign_unsigned() == []
    record = line.last_announcement()[0]
    assert (record.version, record.sequence, record.key_id) == ("policy-0002", 3, key.key_id)
    replica = Replica()
    follower, _ = follower_for(store, replica, key)
    assert follower.initial().version == "policy-0002"


# --- following -----------------------------------------------------------------------------------


class Replica:
    """What a service gives its follower: the version it serves and a swap that records."""

    def __init__(self, serving: str = ""):
        self.serving = serving
        self.swapped: list[VerifiedVersion] = []
        self.loaded: list[bytes] = []

    def swap(self, verified: VerifiedVersion) -> bool:
        self.swapped.append(verified)
        self.loaded.append((verified.path / "model.safetensors").read_bytes())
        self.serving = verified.version
        return True


def follower_for(store, replica, key, check=None, kind=POLICY, copies=None):
    refused = Counter("refused", "refused versions", ["reason"], registry=CollectorRegistry())
    keys = key.verify_keys() if key is not None else None
    follower = VersionFollower(
        VersionLine(store, kind, keys=keys),
        serving=lambda: replica.serving,
        swap=replica.swap,
        refused=refused,
        check=check,
        copies=copies or PrivateCopies(Path(store.root).parent / "copies", kind.name),
    )
    return follower, refused


def count(counter, reason: str) -> float:
    return counter.labels(reason)._value.get()


def signed_event(key, store, version, sequence, reason="publish", sha=None) -> PolicyUpdateEvent:
    """An announcement as a publisher holding ``key`` would make it (for cases the line never makes)."""
    a = Announcement("policy", version, sha or store.manifest_sha256(version), reason, sequence).signed_by(key)
    return POLICY.make_event(a, None, {})


def test_a_verified_announcement_is_swapped_in_from_a_private_copy(store, src, key):
    line = publisher(store, key)
    line.publish(src)
    event = line.announce_pending()
    replica = Replica()
    follower, _ = follower_for(store, replica, key)
    assert follower.accept(event)
    [verified] = replica.swapped
    assert verified.version == "policy-0001" and verified.sequence == 1 and verified.reason == "publish"
    assert verified.manifest_sha256 == store.manifest_sha256("policy-0001")
    assert verified.path != store.path("policy-0001") and store.root not in verified.path.parents
    assert verified.bytes_copied == 64 + len('{"a": 1}') and replica.loaded == [b"\0" * 64]
    # The version served already: ignored, not counted as a refusal.
    assert follower.accept(event) is False and follower.refusals == 0


def test_a_file_changed_after_verification_never_reaches_serving(store, src, key):
    line = publisher(store, key)
    line.publish(src)
    event = line.announce_pending()
    weights = store.path("policy-0001") / "model.safetensors"

    class Swapper(Replica):
        def swap(self, verified):
            weights.write_bytes(b"\1" * 64)  # a compromised pod swaps the file after the check
            return super().swap(verified)

    replica = Swapper()
    follower, _ = follower_for(store, replica, key)
    assert follower.accept(event)
    assert replica.loaded == [b"\0" * 64]  # what was verified, not what the store holds now
    assert weights.read_bytes() == b"\1" * 64


def test_a_replayed_older_announcement_is_refused(store, src, key):
    announcer = RecordingAnnouncer()
    line = publisher(store, key, announcer=announcer)
    for _ in range(2):
        line.publish(src)
        line.announce_pending()
    line.set_current("policy-0001")
    line.announce_pending()  # a signed rollback, sequence 3
    line.set_current("policy-0002")
    line.announce_pending()  # forward again, sequence 4
    first, second, rollback, forward = announcer.events
    replica = Replica()
    follower, refused = follower_for(store, replica, key)
    assert follower.accept(first) and follower.accept(second)
    assert not follower.accept(first)  # a replayed publish of an older version
    assert count(refused, "replayed") == 1 and replica.serving == "policy-0002"
    assert follower.accept(rollback) and replica.serving == "policy-0001"  # a signed rollback: accepted
    assert follower.accept(forward) and replica.serving == "policy-0002"
    assert not follower.accept(rollback)  # the old rollback replayed: no swap storm
    assert count(refused, "replayed") == 2 and replica.serving == "policy-0002"
    assert [v.version for v in replica.swapped] == ["policy-0001", "policy-0002", "policy-0001", "policy-0002"]


def test_an_older_version_announced_as_a_publish_is_refused(store, src, key):
    line = VersionLine(store, POLICY, signer=key)
    line.publish(src)
    line.publish(src)
    replica = Replica("policy-0002")
    follower, refused = follower_for(store, replica, key)
    assert not follower.accept(signed_event(key, store, "policy-0001", 7, reason="publish"))
    assert count(refused, "not_newer") == 1
    assert not follower.accept(signed_event(key, store, "policy-0001", 8, reason="downgrade"))
    assert count(refused, "wrong_reason") == 1 and replica.swapped == []
    assert follower.accept(signed_event(key, store, "policy-0001", 9, reason="rollback"))


def test_bad_missing_or_foreign_announcement_signatures_are_refused(store, src, key):
    line = VersionLine(store, POLICY, signer=key)
    line.publish(src)
    line.publish(src)
    replica = Replica("policy-0001")
    follower, refused = follower_for(store, replica, key)
    good = signed_event(key, store, "policy-0002", 5)
    unsigned = dataclasses.replace(good, key_id="", signature="")
    foreign = signed_event(SigningKey.generate(), store, "policy-0002", 5)
    altered = dataclasses.replace(good, sequence=6)  # the signature covers the sequence
    as_rollback = dataclasses.replace(good, reason="rollback")  # and the reason
    for event in (unsigned, foreign, altered, as_rollback):
        assert not follower.accept(event)
    assert count(refused, "bad_signature") == 4 and replica.swapped == []
    assert follower.sequence == 0  # nothing unauthenticated moves the floor
    assert follower.accept(good)


def test_a_tampered_manifest_or_an_unsigned_version_is_refused(store, src, key):
    line = VersionLine(store, POLICY, signer=key)
    line.publish(src)
    line.publish(src)
    VersionLine(store, POLICY).publish(src)  # policy-0003: unsigned
    replica = Replica("policy-0001")
    follower, refused = follower_for(store, replica, key)
    manifest = store.path("policy-0002") / "manifest.json"
    original_sha = store.manifest_sha256("policy-0002")
    doc = json.loads(manifest.read_bytes())
    doc["files"]["model.safetensors"][doc["digest"]] = blake3.blake3(b"\1" * 64).hexdigest()
    manifest.write_text(json.dumps(doc))
    (store.path("policy-0002") / "model.safetensors").write_bytes(b"\1" * 64)
    # Announced with the tampered manifest's hash (an attacker who can write the store and Kafka
    # cannot sign): the manifest signature fails.
    assert not follower.accept(signed_event(key, store, "policy-0002", 1))
    # Announced with the original hash: fails the same way before the hash is compared.
    assert not follower.accept(signed_event(key, store, "policy-0002", 2, sha=original_sha))
    assert not follower.accept(signed_event(key, store, "policy-0003", 3))
    assert count(refused, "bad_signature") == 3 and replica.swapped == []


def test_announcements_that_do_not_verify_are_refused_and_counted(store, src, key):
    line = VersionLine(store, POLICY, signer=key)
    line.publish(src)
    line.publish(src)
    replica = Replica("policy-0001")
    follower, refused = follower_for(store, replica, key)
    assert not follower.accept(signed_event(key, store, "policy-0002", 1, sha="0" * 64))
    assert count(refused, "manifest_mismatch") == 1
    assert not follower.accept(RewardModelEvent(version="policy-0002", manifest_sha256="x"))
    assert count(refused, "wrong_event") == 1
    assert not follower.accept(PolicyUpdateEvent(version="rm-0001", manifest_sha256="x"))
    assert not follower.accept(PolicyUpdateEvent(version="policy-12\n", manifest_sha256="x"))
    assert count(refused, "wrong_line") == 2
    assert not follower.accept(signed_event(key, store, "policy-0009", 2, sha="ab"))
    assert count(refused, "UnknownVersionError") == 1
    sha = store.manifest_sha256("policy-0002")
    weights = store.path("policy-0002") / "model.safetensors"
    weights.write_bytes(b"\1" * 64)  # changed after publication
    assert not follower.accept(signed_event(key, store, "policy-0002", 3, sha=sha))
    assert count(refused, "CorruptVersionError") == 1
    assert replica.swapped == [] and replica.serving == "policy-0001" and follower.refusals == 6
    assert follower.private.held == []  # no copy of a refused version is kept


def test_the_services_check_can_refuse_a_verified_version(store, src, key):
    VersionLine(store, POLICY, signer=key).publish(src)

    class Incompatible(ValueError):
        pass

    checked = []

    def check(verified):
        checked.append(verified.path)
        raise Incompatible(f"{verified.version} does not fit")

    replica = Replica()
    follower, refused = follower_for(store, replica, key, check=check)
    assert not follower.accept(signed_event(key, store, "policy-0001", 1))
    assert count(refused, "Incompatible") == 1 and replica.swapped == []
    assert store.root not in checked[0].parents and not checked[0].exists()  # checked the copy, then dropped it


def test_private_copies_are_bounded_to_the_served_and_the_previous(store, src, key, tmp_path):
    announcer = RecordingAnnouncer()
    line = publisher(store, key, announcer=announcer)
    replica = Replica()
    copies = PrivateCopies(tmp_path / "copies", "policy")
    follower, _ = follower_for(store, replica, key, copies=copies)
    for _ in range(4):
        line.publish(src)
        assert follower.accept(line.announce_pending())
    held = copies.held
    assert [p.name.rsplit("-", 1)[0] for p in held] == ["policy-0003", "policy-0004"]
    assert copies.bytes_held == 2 * (64 + len('{"a": 1}'))
    assert sorted(p for p in copies.dir.iterdir()) == held
    follower.close()
    assert not copies.dir.exists() and copies.bytes_held == 0


def test_a_follower_reads_the_versions_from_its_own_store(store, src, key, tmp_path):
    # A replica with its own mount of the same files verifies and swaps in its own copy.
    line = publisher(store, key, REWARD_MODEL)
    line.publish(src)
    event = line.announce_pending()
    mirror = tmp_path / "mirror"
    shutil.copytree(store.root, mirror)
    shutil.rmtree(store.root)
    replica = Replica()
    follower, _ = follower_for(ModelStore(mirror), replica, key, kind=REWARD_MODEL)
    assert follower.accept(event) and replica.swapped[0].version == "rm-0001"


# --- restarts --------------------------------------------------------------------------------------


def test_a_restarted_replica_starts_from_the_signed_record_and_keeps_the_floor(store, src, key):
    announcer = RecordingAnnouncer()
    line = publisher(store, key, announcer=announcer)
    for _ in range(3):
        line.publish(src)
        line.announce_pending()
    line.set_current("policy-0002")
    line.announce_pending()  # rollback, sequence 4
    # Someone with write access to the store points the pointer at another version: not trusted.
    store._write_pointer("policy", "policy-0003")
    replica = Replica()
    follower, refused = follower_for(store, replica, key)
    verified = follower.initial()
    assert (verified.version, follower.sequence) == ("policy-0002", 4)
    assert store.root not in verified.path.parents
    replica.serving = verified.version
    # The announcements made before the restart, replayed: refused (the one of the version
    # served is ignored).
    for event in announcer.events[:3]:
        assert not follower.accept(event)
    assert count(refused, "replayed") == 2 and replica.swapped == []


def test_a_replica_refuses_to_start_from_an_unsigned_or_missing_record(store, src, key):
    replica = Replica()
    follower, _ = follower_for(store, replica, key)
    VersionLine(store, POLICY).publish(src)  # an offline publish without a key
    with pytest.raises(VersionRefused, match="unsigned") as err:
        follower.initial()
    assert err.value.reason == "bad_signature"
    (store.root / "policy.announced").unlink()
    with pytest.raises(VersionRefused, match="no signed announcement"):
        follower.initial()
    # An operator's pinned version must still be signed.
    with pytest.raises(VersionRefused, match="policy-0001 is unsigned"):
        follower.initial(pinned="policy-0001")
    VersionLine(store, POLICY, signer=key).publish(src)
    assert follower.initial(pinned="policy-0002").version == "policy-0002"


def test_a_record_signed_by_another_key_is_refused_at_start(store, src, key):
    VersionLine(store, POLICY, signer=SigningKey.generate()).publish(src)
    follower, _ = follower_for(store, Replica(), key)
    with pytest.raises(VersionRefused, match="not trusted"):
        follower.initial()


def test_without_keys_unsigned_versions_pass_but_order_still_applies(store, src):
    announcer = RecordingAnnouncer()
    line = VersionLine(store, POLICY, announcer)  # development: no keys anywhere
    for _ in range(2):
        line.publish(src)
        line.announce_pending()
    replica = Replica()
    follower, refused = follower_for(store, replica, None)
    assert follower.initial().version == "policy-0002" and follower.sequence == 2
    replica.serving = "policy-0002"
    assert not follower.accept(announcer.events[0])
    assert count(refused, "replayed") == 1
    line.publish(src)
    assert follower.accept(line.announce_pending()) and replica.serving == "policy-0003"


# --- pointers: candidate and canary ------------------------------------------------------------------


def test_a_candidate_is_published_under_its_own_pointer_record_and_topic(store, src, key):
    line = publisher(store, key)  # the current pointer: one version, announced
    line.publish(src)
    line.announce_pending()
    announcer = RecordingAnnouncer()
    candidates = publisher(store, key, POLICY_CANDIDATE, announcer)
    manifest = candidates.publish(src, parent="policy-0001")
    # The candidate pointer moved; current did not, and nothing is owed on it.
    assert store.pointer("policy", "candidate") == manifest.version == "policy-0002"
    assert store.current("policy") == "policy-0001" and line.pending_announcement() is None
    assert candidates.pending_announcement() == PendingAnnouncement("policy-0002", "publish")
    event = candidates.announce_pending()
    assert isinstance(event, PolicyCandidateEvent) and (event.version, event.sequence) == ("policy-0002", 1)
    assert announcer.events == [event]
    assert (store.root / "policy.candidate-announced").is_file()
    assert line.last_announcement()[0].sequence == 1 and line.announced() == "policy-0001"
    # The signature covers the pointer: the same fields signed as "policy" would be another message.
    signed = POLICY_CANDIDATE.announcement(event)
    assert signed.line == "policy.candidate"
    key.verify_keys().verify(signed.message(), signed.signature_doc())
    assert (POLICY_CANDIDATE.topic, POLICY_CANDIDATE.key) == (POLICY_CANDIDATES, "policy.candidate")
    assert (POLICY_CANARY.topic, POLICY_CANARY.key) == (topics.POLICY_CANARY, "policy.canary")
    assert POLICY_KINDS == {"current": POLICY, "candidate": POLICY_CANDIDATE, "canary": POLICY_CANARY}


def test_each_pointer_numbers_its_own_announcements(store, src, key):
    current = publisher(store, key)
    canary = publisher(store, key, POLICY_CANARY)
    for _ in range(3):
        current.publish(src)
        current.announce_pending()
    assert canary.pending_announcement() is None  # never set: nothing owed
    canary.point_to("policy-0003")
    assert canary.announce_pending().sequence == 1
    assert current.last_announcement()[0].sequence == 3
    current.point_to("policy-0003")  # already there: nothing owed, not verified again
    assert current.pending_announcement() is None


def test_a_follower_of_one_pointer_refuses_another_pointers_announcements(store, src, key):
    current = publisher(store, key)
    candidates = publisher(store, key, POLICY_CANDIDATE)
    current.publish(src)
    current.announce_pending()
    candidates.publish(src)
    candidate_event = candidates.announce_pending()
    replica = Replica("policy-0001")
    follower, refused = follower_for(store, replica, key)  # follows current
    assert not follower.accept(candidate_event)
    assert count(refused, "wrong_event") == 1
    # The same signed fields re-wrapped as a PolicyUpdateEvent: the signature is of "policy.candidate".
    disguised = PolicyUpdateEvent(**dataclasses.asdict(candidate_event))
    assert not follower.accept(disguised)
    assert count(refused, "bad_signature") == 1 and replica.swapped == []
    canary_replica = Replica("policy-0001")
    canary_follower, canary_refused = follower_for(store, canary_replica, key, kind=POLICY_CANARY)
    assert not canary_follower.accept(PolicyCanaryEvent(**dataclasses.asdict(candidate_event)))
    assert count(canary_refused, "bad_signature") == 1


def test_the_canary_pointer_goes_back_to_stable_as_a_signed_rollback(store, src, key):
    current = publisher(store, key)
    current.publish(src)
    current.announce_pending()
    candidates = publisher(store, key, POLICY_CANDIDATE)
    candidates.publish(src)
    canary = publisher(store, key, POLICY_CANARY)
    canary.point_to("policy-0001")
    stable_again = canary.announce_pending()  # no canary yet: the canary group serves stable
    canary.point_to("policy-0002")
    started = canary.announce_pending()
    canary.point_to("policy-0001")  # the canary is rolled back
    ended = canary.announce_pending()
    assert [(e.version, e.reason, e.sequence) for e in (stable_again, started, ended)] == [
        ("policy-0001", "publish", 1),
        ("policy-0002", "publish", 2),
        ("policy-0001", "rollback", 3),
    ]
    replica = Replica()
    follower, refused = follower_for(store, replica, key, kind=POLICY_CANARY)
    assert follower.initial().version == "policy-0001" and follower.sequence == 3
    replica.serving = "policy-0001"
    assert not follower.accept(started)  # replayed: the canary does not come back
    assert count(refused, "replayed") == 1
    canary.point_to("policy-0002")
    assert follower.accept(canary.announce_pending()) and replica.serving == "policy-0002"
    canary.point_to("policy-0001")
    assert follower.accept(canary.announce_pending()) and replica.serving == "policy-0001"
    # A "publish" of the older version (not a signed rollback) is refused as on any pointer.
    forged = POLICY_CANARY.make_event(
        Announcement("policy.canary", "policy-0001", store.manifest_sha256("policy-0001"), "publish", 9).signed_by(key),
        None,
        {},
    )
    replica.serving = "policy-0002"
    assert not follower.accept(forged) and count(refused, "not_newer") == 1


def test_a_canary_replica_starts_from_current_until_the_canary_pointer_is_announced(store, src, key):
    current = publisher(store, key)
    for _ in range(2):
        current.publish(src)
        current.announce_pending()
    replica = Replica()
    follower, _ = follower_for(store, replica, key, kind=POLICY_CANARY)
    verified = follower.initial()
    # The stable version, with no floor: the current pointer's numbers are not the canary's.
    assert (verified.version, follower.sequence) == ("policy-0002", 0)
    replica.serving = "policy-0002"
    canary = publisher(store, key, POLICY_CANARY)
    current.publish(src)
    canary.point_to("policy-0003")
    assert follower.accept(canary.announce_pending()) and replica.serving == "policy-0003"
    # Once the canary pointer is announced, a restart starts from its own record.
    assert follower_for(store, Replica(), key, kind=POLICY_CANARY)[0].initial().version == "policy-0003"


def test_an_offline_candidate_line_settles_its_own_record(store, src, key):
    candidates = VersionLine(store, POLICY_CANDIDATE, signer=key)
    candidates.publish(src)
    assert candidates.pending_announcement() is None and candidates.announced() == "policy-0001"
    assert store.current("policy") == "policy-0001"  # the latest, as ever: no current pointer was written
    assert not (store.root / "policy.current").exists()
