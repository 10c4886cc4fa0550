"""A version line: the versions of one model family as they are published, signed, announced,
followed, verified and swapped in. The trainer publishes the ``policy`` line, the reward learner the
``rm`` line; inference replicas follow the first, reward scorers the second.

Publishing side (one publisher per line, holding the line's signing key):

    line = VersionLine(store, POLICY, KafkaAnnouncer(KafkaPublisher(kafka, "trainer"), POLICY), signer=key)
    manifest = line.publish(out_dir, parent="policy-0002", metrics={...}, extra={...})  # atomic, signed, current
    ...                                   # record what the publisher must remember (checkpoint, SQLite)
    line.announce_pending()               # then tell the followers (acks=all); None: still owed
    line.set_current("policy-0002")       # a rollback: announced by the next announce_pending()

**Signed versions.** ``publish`` signs each version: ``manifest.sig`` beside ``manifest.json`` holds
an Ed25519 signature of the manifest's exact bytes, line and version (shared/signing.py), written
before the version's directory is renamed into place, so a version is visible signed or not at all.

**Signed, numbered announcements; the announcement owed is durable.** The store's
``<line>.current`` pointer says which version is current; ``<line>.announced`` holds the line's last
announcement: version, manifest sha256, reason, a sequence number and the publisher's signature of
all of them, and whether Kafka acknowledged it. ``announce_pending`` sends what is owed: the current
version when the record names another one (a new announcement with the next sequence number,
written to the record *before* it is sent, so a number is never issued twice), or the record's own
announcement again when Kafka never acknowledged it (same number: a follower that got it the first
time ignores the version it serves). A publisher killed anywhere finds the owed announcement in
the store on restart. The reason is derived: a current version older than the recorded one is a
"rollback", anything else a "publish". A line without an announcer (offline tools: ``rlhf
bootstrap``, ``rlhf train-rm``) records what it makes current as a settled, signed announcement, so
replicas that start later trust it.

Following side (every replica, holding the line's verify keys):

    follower = VersionFollower(VersionLine(store, REWARD_MODEL, keys=verify_keys), serving=lambda: scorer.version,
                               swap=scorer.swap_to, refused=metrics.SWAP_REFUSED, copies=PrivateCopies(dir, "rm"))
    follower.subscribe(TopicFollower(kafka, "reward", REWARD_MODEL.topic))  # at the end, BEFORE the store
    verified = follower.initial()          # the version to start from, verified, in a private copy
    scorer.load_verified(verified)         # loads verified.path: the bytes that were checked
    follower.start()                       # a thread: announcement -> verify -> swap
    follower.accept(event)                 # what that thread does with each announcement

``verify`` refuses (counts in ``refused`` by reason, logs, returns None), in this order, an
announcement that is not of the line (``wrong_event``, ``wrong_line``), whose signature does not
verify under the line's keys (``bad_signature``: unsigned, another key, or altered), whose sequence
number is not above the highest one this replica has seen (``replayed``), that announces as a
"publish" a version not newer than the one served (``not_newer``; only a signed "rollback" goes
back), whose version is unsigned or badly signed (``bad_signature``), whose manifest is not the
announced one (``manifest_mismatch``), whose files do not match the manifest while they are copied
into the replica's private directory (``CorruptVersionError``), or that the service's ``check``
rejects (e.g. inference: the weights cannot replace the served ones in place). Only a verified
version reaches ``swap``, and ``swap`` loads the private copy (``VerifiedVersion.path``), never the
store. An announcement of the version already served is ignored (not counted).

**Restarts.** A replica has no memory of its own: ``initial`` reads the store's ``<line>.announced``
record, verifies its signature, starts from its version (verified, signed, copied) and takes its
sequence number as the floor below which every announcement is a replay. It trusts the verify keys
(configuration) and what they signed, nothing unsigned: not the ``<line>.current`` pointer (anyone
with write access to the store could point it at an old version), and no unsigned record. What a
store writer can still do is put back an *older signed* record, which a replica restarting then
starts from (it cannot forge a newer one); the next announcement corrects it. Without verify keys
(a development setup on loopback, see shared/config.py VersionTrustConfig) nothing is
authenticated, but sequence numbers and "not newer" still apply.

A line is described by a ``LineKind`` (its store line name, topic, event type and Kafka key); the
signature and the sequence live here, not in the services, so a new kind of version (LoRA adapters
whose manifest names a base version, canary versions) is one more ``LineKind`` on the same machinery.

**Pointers.** A kind tracks one *pointer* of its store line: ``current`` (what every replica serves;
``POLICY``, ``REWARD_MODEL``) or another one of the progressive rollout: ``POLICY_CANDIDATE`` (the
trainer's newest gated version, ``policy.candidate``, announced on rlhf.policy-candidates) and
``POLICY_CANARY`` (what the canary replicas serve, ``policy.canary``, announced on rlhf.policy-canary
by the rollout service, which also moves ``current`` on a promotion). Each pointer has its own
announcement record (``policy.announced``, ``policy.candidate-announced``,
``policy.canary-announced``), its own sequence numbers, its own topic and event type, and its
signatures cover the pointer (the signed line is ``policy``, ``policy.candidate`` or
``policy.canary``), so an announcement of one pointer cannot be replayed as another's. The rules
are the same for every pointer: the canary pointer going back to the stable version when a canary
is rolled back is a signed "rollback" of that pointer. A follower of the canary pointer that starts
before the pointer was ever announced starts from the ``current`` one (``LineKind.fallback``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from shared.events import PolicyCanaryEvent, PolicyCandidateEvent, PolicyUpdateEvent, RewardModelEvent
from shared.kafka import topics
from shared.kafka.topics import POLICY_CANDIDATES, POLICY_UPDATES, REWARD_MODELS
from shared.logging import get_logger, log_event
from shared.model_store import (
    CURRENT,
    FileDigest,
    Manifest,
    ModelStore,
    ModelStoreError,
    StoredManifest,
    version_number,
)
from shared.signing import (
    Signature,
    SignatureError,
    SigningKey,
    VerifyKeys,
    announcement_message,
    manifest_message,
)
from shared.version_copies import PrivateCopies

log = get_logger(__name__)

ANNOUNCE_FAILURES = Counter(
    "rlhf_version_announce_failures_total", "Announcements Kafka did not acknowledge (retried)", ["line"]
)
ANNOUNCEMENT_OWED = Gauge(
    "rlhf_version_announcement_owed", "1 while the line's current version is not yet announced", ["line"]
)
ANNOUNCED = Counter("rlhf_version_announced_total", "Versions announced, by line and reason", ["line", "reason"])
SIGNATURES_ENFORCED = Gauge(
    "rlhf_version_signatures_enforced",
    "1 when this replica requires signed versions and announcements of the line (0: development mode)",
    ["line"],
)
SEQUENCE_SEEN = Gauge(
    "rlhf_version_sequence_seen", "Highest authentic announcement sequence number this replica has seen", ["line"]
)

REASONS = ("publish", "rollback")
ANNOUNCED_RECORD = "announced"
"""The announcement record of the ``current`` pointer; another pointer's is ``<pointer>-announced``."""


@dataclass(frozen=True)
class Announcement:
    """What a publisher says about its line, and signs: serve ``version`` (whose manifest has this
    sha256), for this ``reason``, as its ``sequence``-th announcement."""

    line: str
    version: str
    manifest_sha256: str
    reason: str
    sequence: int
    key_id: str = ""
    signature: str = ""
    """Base64 Ed25519 signature of ``message()``; empty: unsigned."""

    def message(self) -> bytes:
        return announcement_message(self.line, self.version, self.manifest_sha256, self.reason, self.sequence)

    def signed_by(self, key: SigningKey | None) -> Announcement:
        if key is None:
            return self
        sig = key.sign(self.message())
        return Announcement(
            self.line, self.version, self.manifest_sha256, self.reason, self.sequence, sig.key_id, sig.signature
        )

    def signature_doc(self) -> Signature | None:
        return Signature(self.key_id, self.signature) if self.signature else None

    def to_record(self, acked: bool) -> dict[str, Any]:
        return {
            "line": self.line,
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "reason": self.reason,
            "sequence": self.sequence,
            "key_id": self.key_id,
            "signature": self.signature,
            "acked": acked,
        }

    @classmethod
    def from_record(cls, doc: dict[str, Any], line: str) -> Announcement:
        """The announcement of a ``<line>.announced`` record (ValueError when malformed). Records
        written before announcements were numbered and signed read as sequence 0, unsigned."""
        try:
            return cls(
                line=str(doc.get("line", line)),
                version=str(doc["version"]),
                manifest_sha256=str(doc.get("manifest_sha256", "")),
                reason=str(doc.get("reason", "publish")),
                sequence=int(doc.get("sequence", 0)),
                key_id=str(doc.get("key_id", "")),
                signature=str(doc.get("signature", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{line}.{ANNOUNCED_RECORD} is malformed: {exc}") from None


@dataclass(frozen=True)
class LineKind:
    """What makes a family of versions a line: where it lives, which pointer of it is followed, and
    how that pointer is announced."""

    name: str
    """The model store line (versions are ``<name>-NNNN``)."""
    topic: str
    """Where its versions are announced."""
    event_type: type[Any]
    """The announcement payload: built by ``make_event``, the only type a follower accepts. It carries
    the fields of an ``Announcement`` (version, manifest_sha256, reason, sequence, key_id, signature)."""
    make_event: Callable[[Announcement, str | None, dict[str, float]], Any]
    """(the signed announcement, parent, metrics) -> the payload."""
    pointer: str = CURRENT
    """The pointer of the store line this kind moves and announces (``<name>.<pointer>``):
    ``current``, ``candidate`` or ``canary`` (shared.model_store.POINTERS)."""
    fallback: LineKind | None = None
    """Where a starting follower takes its version while this pointer has no announcement record
    yet (the canary pointer: the current one, i.e. the stable version)."""

    @property
    def label(self) -> str:
        """The line as signed, counted and logged: ``policy`` for the current pointer, else
        ``policy.<pointer>`` (so that an announcement of one pointer never verifies as another's)."""
        return self.name if self.pointer == CURRENT else f"{self.name}.{self.pointer}"

    @property
    def key(self) -> str:
        """Kafka key of every announcement of the line: one partition, so they stay in order."""
        return self.label

    @property
    def announced_record(self) -> str:
        """The store record of the pointer's last announcement (``<name>.<announced_record>``)."""
        return ANNOUNCED_RECORD if self.pointer == CURRENT else f"{self.pointer}-{ANNOUNCED_RECORD}"

    def announcement(self, event: Any) -> Announcement:
        """The signed fields of a payload of this line (the line is the follower's, not the payload's)."""
        return Announcement(
            line=self.label,
            version=event.version,
            manifest_sha256=str(event.manifest_sha256),
            reason=str(event.reason),
            sequence=int(event.sequence),
            key_id=str(event.key_id),
            signature=str(event.signature),
        )


POLICY = LineKind(
    "policy",
    POLICY_UPDATES,
    PolicyUpdateEvent,
    lambda a, parent, metrics: PolicyUpdateEvent(
        version=a.version,
        manifest_sha256=a.manifest_sha256,
        parent=parent,
        reason=a.reason,
        metrics=metrics,
        sequence=a.sequence,
        key_id=a.key_id,
        signature=a.signature,
    ),
)
REWARD_MODEL = LineKind(
    "rm",
    REWARD_MODELS,
    RewardModelEvent,
    lambda a, parent, metrics: RewardModelEvent(
        version=a.version,
        manifest_sha256=a.manifest_sha256,
        parent=parent,
        metrics=metrics,
        reason=a.reason,
        sequence=a.sequence,
        key_id=a.key_id,
        signature=a.signature,
    ),
)


POLICY_CANDIDATE = LineKind(
    "policy",
    POLICY_CANDIDATES,
    PolicyCandidateEvent,
    lambda a, parent, metrics: PolicyCandidateEvent(
        version=a.version,
        manifest_sha256=a.manifest_sha256,
        parent=parent,
        reason=a.reason,
        metrics=metrics,
        sequence=a.sequence,
        key_id=a.key_id,
        signature=a.signature,
    ),
    pointer="candidate",
)
"""The trainer's gated versions, each a candidate for the canary (rollout on)."""
POLICY_CANARY = LineKind(
    "policy",
    topics.POLICY_CANARY,
    PolicyCanaryEvent,
    lambda a, parent, metrics: PolicyCanaryEvent(
        version=a.version,
        manifest_sha256=a.manifest_sha256,
        parent=parent,
        reason=a.reason,
        metrics=metrics,
        sequence=a.sequence,
        key_id=a.key_id,
        signature=a.signature,
    ),
    pointer="canary",
    fallback=POLICY,
)
"""What the canary replicas serve (the rollout service moves it; the stable version when no canary runs)."""
POLICY_KINDS = {kind.pointer: kind for kind in (POLICY, POLICY_CANDIDATE, POLICY_CANARY)}
"""The policy line's kinds by pointer (``RLHF_INFERENCE_FOLLOW`` picks one)."""


class Announcer(Protocol):
    def announce(self, event: Any) -> None:
        """Deliver the announcement or raise."""


class KafkaAnnouncer:
    """Announces on the line's topic and waits for Kafka's acks=all acknowledgement."""

    def __init__(self, publisher: Any, kind: LineKind):
        self.publisher = publisher
        """Anything with ``publish_and_wait(topic, payload, key=...)`` (a shared.kafka.publishers.Publisher)."""
        self.kind = kind

    def announce(self, event: Any) -> None:
        self.publisher.publish_and_wait(self.kind.topic, event, key=self.kind.key)


@dataclass(frozen=True)
class PendingAnnouncement:
    version: str
    reason: str
    """"publish" (a version newer than the last announced) or "rollback" (an older one)."""


@dataclass(frozen=True)
class StoreFile:
    """A file of a verified version left in the store (``VersionFollower.defer``): whoever reads it
    checks its bytes against ``digest`` (from the signed manifest) as it reads them, and uses only
    the bytes it checked."""

    rel: str
    path: Path
    digest: FileDigest
    algorithm: str


@dataclass(frozen=True)
class VerifiedVersion:
    """A version whose signature verified, whose manifest was the announced one, and whose files
    matched it as they were copied into ``path``: a directory private to this replica."""

    version: str
    path: Path
    manifest: Manifest
    manifest_sha256: str
    reason: str = "publish"
    sequence: int = 0
    bytes_copied: int = 0
    deferred: tuple[StoreFile, ...] = ()
    """Files not copied into ``path`` (VersionFollower.defer): checked by their reader instead."""


class VersionRefused(Exception):
    """An announced version that may not be swapped in; ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class VersionLine:
    """One line of the model store, with its signatures and announcements."""

    def __init__(
        self,
        store: ModelStore,
        kind: LineKind,
        announcer: Announcer | None = None,
        *,
        signer: SigningKey | None = None,
        keys: VerifyKeys | None = None,
    ):
        self.store = store
        self.kind = kind
        self.announcer = announcer
        """None: nothing is announced (offline publishes); what is made current is recorded as settled."""
        self.signer = signer
        """The publisher's key: signs versions and announcements (None: unsigned, development only)."""
        self.keys = keys
        """The followers' trusted keys (None: nothing is authenticated, development only)."""

    # --- publishing ------------------------------------------------------------------------------

    def publish(
        self,
        src_dir: Path,
        *,
        parent: str | None = None,
        metrics: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
        make_current: bool = True,
        move: bool = False,
        hashed: Mapping[str, tuple[str, int]] | None = None,
    ) -> Manifest:
        """Copy ``src_dir`` into the store as the line's next version (atomic, digest manifest,
        signed) and, with ``make_current``, move this kind's pointer to it (``current`` for POLICY, the
        candidate pointer for POLICY_CANDIDATE); its announcement is then owed until
        ``announce_pending`` succeeds. ``move``, ``hashed``: ``ModelStore.publish``'s (the files are taken,
        not copied; those hashed by their writer are not read)."""
        on_current = self.kind.pointer == CURRENT
        manifest = self.store.publish(
            self.kind.name,
            src_dir,
            parent=parent,
            metrics=metrics,
            extra=extra,
            make_current=make_current and on_current,
            sign=self._sign_manifest if self.signer is not None else None,
            move=move,
            hashed=hashed,
        )
        if make_current and not on_current:
            self.store.set_pointer(self.kind.name, self.kind.pointer, manifest.version, verify=False)
        log_event(
            log,
            "published",
            line=self.kind.label,
            version=manifest.version,
            parent=parent or "",
            key_id=self.signer.key_id if self.signer else "",
        )
        if make_current:
            self._settle_if_offline(manifest.version)
        self._show_owed(self.pending_announcement())
        return manifest

    def _sign_manifest(self, line: str, version: str, manifest_bytes: bytes) -> bytes:
        assert self.signer is not None
        return self.signer.sign(manifest_message(line, version, manifest_bytes)).to_json()

    def set_current(self, version: str) -> Manifest:
        """Point this kind's pointer at an existing version (verified first): for POLICY a rollback
        of ``current``; the announcement is owed (a "rollback" when older than the last announced)."""
        self.store.set_pointer(self.kind.name, self.kind.pointer, version)
        self._settle_if_offline(version)
        self._show_owed(self.pending_announcement())
        return self.store.manifest(version)

    def point_to(self, version: str) -> Manifest:
        """``set_current``, except that a pointer already at ``version`` is left as it is (not
        verified again): for a caller that repeats its moves (the rollout service's restore)."""
        if self.pointed() == version:
            self._show_owed(self.pending_announcement())
            return self.store.manifest(version)
        return self.set_current(version)

    def pointed(self) -> str | None:
        """The version this kind's pointer names in the store (``current``: the latest when unset)."""
        return self.store.pointer(self.kind.name, self.kind.pointer)

    def last_announcement(self) -> tuple[Announcement, bool] | None:
        """(the line's last announcement, whether Kafka acknowledged it), or None before the first.
        Not verified: this is the publisher's own record (followers use ``trusted_record``)."""
        doc = self.store.read_line_record(self.kind.name, self.kind.announced_record)
        if doc is None:
            return None
        try:
            return Announcement.from_record(doc, self.kind.label), bool(doc.get("acked", True))
        except ValueError as exc:
            raise ModelStoreError(str(exc)) from None

    def announced(self) -> str | None:
        """The version of the line's last announcement (None: none yet)."""
        last = self.last_announcement()
        return last[0].version if last else None

    def pending_announcement(self) -> PendingAnnouncement | None:
        """The announcement owed: the current version when the last announcement names another one
        or was never acknowledged."""
        current = self.pointed()
        last = self.last_announcement()
        if current is None:
            return None
        if last is None:
            return PendingAnnouncement(current, "publish")
        announcement, acked = last
        if current == announcement.version:
            return None if acked else PendingAnnouncement(current, announcement.reason)
        older = version_number(current) < version_number(announcement.version)
        return PendingAnnouncement(current, "rollback" if older else "publish")

    def announce_pending(self) -> Any | None:
        """Send the announcement owed, if any, and record it once acknowledged. Returns the event
        sent; None when nothing was owed, or when sending failed (logged, counted, still owed)."""
        pending = self.pending_announcement()
        if pending is None or self.announcer is None:
            self._show_owed(pending)
            return None
        announcement = self._announcement_for(pending)
        manifest = self.store.manifest(pending.version)
        event = self.kind.make_event(announcement, manifest.parent, dict(manifest.metrics))
        try:
            self.announcer.announce(event)
        except Exception as exc:  # noqa: BLE001 - any producer error: the announcement stays owed
            ANNOUNCE_FAILURES.labels(self.kind.label).inc()
            self._show_owed(pending)
            log_event(
                log,
                "announcement failed; it stays owed and is retried",
                level=30,
                line=self.kind.label,
                version=pending.version,
                sequence=announcement.sequence,
                error=f"{type(exc).__name__}: {exc}",
            )
            return None
        self._write_record(announcement, acked=True)
        ANNOUNCED.labels(self.kind.label, pending.reason).inc()
        self._show_owed(None)
        log_event(
            log,
            "announced",
            line=self.kind.label,
            version=pending.version,
            reason=announcement.reason,
            sequence=announcement.sequence,
        )
        return event

    def _announcement_for(self, pending: PendingAnnouncement, *, acked: bool = False) -> Announcement:
        """The record's unacknowledged announcement of this version again, or a new one with the
        next sequence number, written to the record (before it is sent: never issued twice)."""
        sha = self.store.manifest_sha256(pending.version)
        last = self.last_announcement()
        if last is not None:
            previous, was_acked = last
            same = previous.version == pending.version and previous.manifest_sha256 == sha
            if not was_acked and same and (self.signer is None or previous.key_id == self.signer.key_id):
                return previous
        sequence = (last[0].sequence if last else 0) + 1
        announcement = Announcement(self.kind.label, pending.version, sha, pending.reason, sequence).signed_by(
            self.signer
        )
        self._write_record(announcement, acked=acked)
        return announcement

    def _write_record(self, announcement: Announcement, *, acked: bool) -> None:
        self.store.write_line_record(self.kind.name, self.kind.announced_record, announcement.to_record(acked))

    def _settle_if_offline(self, version: str) -> None:
        if self.announcer is None:
            pending = self.pending_announcement()
            if pending is not None:
                self._announcement_for(pending, acked=True)

    def _show_owed(self, pending: PendingAnnouncement | None) -> None:
        ANNOUNCEMENT_OWED.labels(self.kind.label).set(1 if pending else 0)

    def sign_unsigned(self) -> list[str]:
        """Sign every version of the line that has no signature (each verified first) and, when the
        line's last announcement is unsigned, record the current version as a signed, settled one.
        For adopting a store made before signing existed (``rlhf up`` on its own local store);
        returns the versions signed."""
        if self.signer is None:
            raise ValueError("sign_unsigned needs a signing key")
        signed = []
        for version in self.store.versions(self.kind.name):
            if self.store.read_manifest(version).signature is None:
                self.store.verify(version)
                self.store.add_signature(version, self._sign_manifest(self.kind.name, version, self._raw(version)))
                signed.append(version)
        current = self.pointed()
        last = self.last_announcement()
        if current is not None and (last is None or last[0].key_id != self.signer.key_id):
            sequence = (last[0].sequence if last else 0) + 1
            sha = self.store.manifest_sha256(current)
            self._write_record(
                Announcement(self.kind.label, current, sha, "publish", sequence).signed_by(self.signer), acked=True
            )
        if signed:
            log_event(log, "signed versions published before signing", line=self.kind.label, versions=signed)
        return signed

    def _raw(self, version: str) -> bytes:
        return self.store.read_manifest(version).raw

    # --- following -------------------------------------------------------------------------------

    @property
    def enforced(self) -> bool:
        """Whether followers of this line require signatures (verify keys are configured)."""
        return self.keys is not None

    def authenticate(self, announcement: Announcement) -> None:
        """VersionRefused("bad_signature") unless the announcement is signed by a trusted key."""
        if self.keys is None:
            return
        try:
            self.keys.verify(announcement.message(), announcement.signature_doc())
        except SignatureError as exc:
            raise VersionRefused(
                "bad_signature", f"announcement of {announcement.version} (sequence {announcement.sequence}): {exc}"
            ) from None

    def read_announcement(self, event: Any) -> Announcement:
        """The authenticated announcement of an event of this line (VersionRefused otherwise)."""
        if not isinstance(event, self.kind.event_type):
            raise VersionRefused("wrong_event", f"{type(event).__name__} is not an announcement of {self.kind.label}")
        version = event.version
        try:
            line_ok = version.rsplit("-", 1)[0] == self.kind.name and version_number(version) > 0
        except (ModelStoreError, AttributeError):
            line_ok = False
        if not line_ok:
            raise VersionRefused("wrong_line", f"{version!r} is not a version of the {self.kind.name} line")
        try:
            announcement = self.kind.announcement(event)
        except (AttributeError, TypeError, ValueError) as exc:
            raise VersionRefused("wrong_event", f"malformed announcement of {version}: {exc}") from None
        self.authenticate(announcement)
        return announcement

    def trusted_record(self, *, required: bool = True) -> Announcement | None:
        """The line's last announcement as recorded in the store, authenticated (a replica's start:
        see "Restarts" above). None when there is none (refused when signatures are enforced,
        unless not ``required``: a replica told which version to serve)."""
        last = self.last_announcement()
        if last is None:
            if self.enforced and required:
                raise VersionRefused(
                    "bad_signature",
                    f"the store has no signed announcement of the {self.kind.label} line "
                    f"({self.kind.name}.{self.kind.announced_record}): publish with the line's signing key",
                )
            return None
        self.authenticate(last[0])
        return last[0]

    def read_signed(self, version: str) -> StoredManifest:
        """The version's manifest, read once, whose signature verifies (VersionRefused otherwise)."""
        stored = self.store.read_manifest(version)
        if self.keys is None:
            return stored
        try:
            if stored.signature is None:
                raise SignatureError(f"{version} is unsigned")
            self.keys.verify(
                manifest_message(self.kind.name, version, stored.raw), Signature.from_json(stored.signature)
            )
        except SignatureError as exc:
            raise VersionRefused("bad_signature", f"{version}: {exc}") from None
        return stored

    def materialize(
        self,
        version: str,
        copies: PrivateCopies,
        *,
        expected_sha256: str | None,
        reason: str = "publish",
        sequence: int = 0,
        defer: Callable[[Manifest, str], bool] | None = None,
    ) -> VerifiedVersion:
        """``version`` signed, its manifest the expected one, its files checked as they are copied
        into a private directory, except those ``defer(manifest, relative path)`` names, listed in
        ``deferred`` for their reader to check. Raises VersionRefused or ModelStoreError."""
        stored = self.read_signed(version)
        if expected_sha256 is not None and stored.sha256 != expected_sha256:
            raise VersionRefused(
                "manifest_mismatch",
                f"{version}: manifest sha256 {stored.sha256[:12]}… does not match the announced {expected_sha256[:12]}…",
            )
        manifest = stored.manifest
        skip = (lambda rel: defer(manifest, rel)) if defer is not None else None
        path, size = copies.copy(self.store, version, manifest, skip)
        deferred = tuple(
            StoreFile(rel, self.store.path(version) / rel, digest, manifest.digest)
            for rel, digest in sorted(manifest.files.items())
            if skip is not None and skip(rel)
        )
        return VerifiedVersion(version, path, manifest, stored.sha256, reason, sequence, size, deferred)


@dataclass
class VersionFollower:
    """A replica's side of a line: authenticate each announcement, refuse replays and steps back,
    verify the version into a private copy, hand it to ``swap``."""

    line: VersionLine
    serving: Callable[[], str]
    """The version the replica serves now (an announcement of it is ignored)."""
    swap: Callable[[VerifiedVersion], bool]
    """Serve the verified version (load ``verified.path``) from now on; True when the served version changed."""
    refused: Any
    """The service's Counter of refused versions, labelled by reason."""
    check: Callable[[VerifiedVersion], None] | None = None
    """Service-specific acceptance (raise ValueError, a subclass, or VersionRefused to refuse)."""
    copies: PrivateCopies | None = None
    """Where verified versions are copied (default: a directory under the system's temp dir)."""
    defer: Callable[[Manifest, str], bool] | None = None
    """Files of announced versions not copied ((manifest, relative path) -> True), left for the swap to read
    and check itself (``VerifiedVersion.deferred``: the inference engine's weight files). The
    starting version is copied whole."""
    refusals: int = 0
    sequence: int = 0
    """The highest authentic announcement sequence seen: announcements at or below it are replays."""
    _reader: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.copies is None:
            self.copies = PrivateCopies(None, self.line.kind.name)
        SIGNATURES_ENFORCED.labels(self.line.kind.label).set(1 if self.line.enforced else 0)
        if not self.line.enforced:
            log_event(
                log,
                "signatures of this line are NOT verified (no verify keys): development mode",
                level=30,
                line=self.line.kind.label,
            )

    @property
    def private(self) -> PrivateCopies:
        assert self.copies is not None  # set in __post_init__
        return self.copies

    # --- start ---------------------------------------------------------------------------------

    def initial(self, pinned: str | None = None) -> VerifiedVersion | None:
        """The version a starting replica serves, verified and copied (promoted: it is served from
        now on), and the sequence floor: the store's authenticated announcement record gives both;
        ``pinned`` (an operator's choice) overrides the version, which must still be signed. None
        when the line has no version. Raises VersionRefused or ModelStoreError."""
        line, floor = self.line, True
        fallback = line.kind.fallback
        if fallback is not None and line.last_announcement() is None:
            # The pointer was never announced (e.g. no canary ever ran): start from the fallback
            # pointer's record; its sequence numbers are another pointer's, so no floor from it.
            line, floor = VersionLine(line.store, fallback, keys=line.keys), False
        record = line.trusted_record(required=not pinned)
        version = pinned or (record.version if record else line.pointed())
        if not version:
            return None
        expected = record.manifest_sha256 if record and record.version == version and record.manifest_sha256 else None
        verified = self.line.materialize(
            version,
            self.private,
            expected_sha256=expected,
            reason=record.reason if record else "publish",
            sequence=record.sequence if record and floor else 0,
        )
        with self._lock:
            self._see(record.sequence if record and floor else 0)
        self.private.promote(verified.path)
        log_event(
            log,
            "starting from a verified version",
            line=self.line.kind.label,
            version=version,
            sequence=self.sequence,
            pinned=bool(pinned),
            signed=self.line.enforced,
        )
        return verified

    def local(self, version: str) -> VerifiedVersion:
        """A version this process published itself (the reward learner's), verified into a private
        copy; the caller loads it and calls ``settle``. Its announcement, when it arrives, is of the
        version served: ignored."""
        return self.line.materialize(version, self.private, expected_sha256=None)

    def settle(self, verified: VerifiedVersion, served: bool) -> None:
        """After ``swap``: keep the copy served (and the previous one), or delete a refused one."""
        if served:
            self.private.promote(verified.path)
        else:
            self.private.discard(verified.path)

    # --- announcements ---------------------------------------------------------------------------

    def verify(self, event: Any) -> VerifiedVersion | None:
        """The verified version, or None: already served (not counted) or refused (counted, logged)."""
        version = getattr(event, "version", None)
        try:
            announcement = self.line.read_announcement(event)
            with self._lock:
                served = self.serving()
                if announcement.version == served:
                    self._see(announcement.sequence)
                    return None
                self._check_order(announcement, served)
                self._see(announcement.sequence)
            return self._verify_files(announcement)
        except VersionRefused as exc:
            self.refuse(str(version), exc.reason, str(exc))
        except (ModelStoreError, ValueError, OSError) as exc:
            self.refuse(str(version), type(exc).__name__, str(exc))
        return None

    def _check_order(self, announcement: Announcement, served: str) -> None:
        """Refuse a replayed sequence number, an unknown reason, and a publish that is not newer."""
        if announcement.sequence <= self.sequence:
            raise VersionRefused(
                "replayed",
                f"sequence {announcement.sequence} of {announcement.version} is not above {self.sequence}, "
                "the highest already seen",
            )
        if announcement.reason not in REASONS:
            raise VersionRefused("wrong_reason", f"unknown announcement reason {announcement.reason!r}")
        if (
            announcement.reason == "publish"
            and served
            and version_number(announcement.version) <= version_number(served)
        ):
            raise VersionRefused(
                "not_newer",
                f"{announcement.version} announced as a publish is not newer than {served} "
                "(only a signed rollback goes back)",
            )

    def _see(self, sequence: int) -> None:
        """Raise the floor: any announcement numbered at or below an authentic one is superseded."""
        if sequence > self.sequence:
            self.sequence = sequence
            SEQUENCE_SEEN.labels(self.line.kind.label).set(sequence)

    def _verify_files(self, announcement: Announcement) -> VerifiedVersion:
        verified = self.line.materialize(
            announcement.version,
            self.private,
            expected_sha256=announcement.manifest_sha256,
            reason=announcement.reason,
            sequence=announcement.sequence,
            defer=self.defer,
        )
        if self.check is not None:
            try:
                self.check(verified)
            except BaseException:
                self.private.discard(verified.path)
                raise
        return verified

    def refuse(self, version: str, reason: str, error: str) -> None:
        """Count and log a version that will not be served (verification or loading failed)."""
        self.refusals += 1
        self.refused.labels(reason).inc()
        log_event(
            log,
            "refused an announced version; still serving the old one",
            level=40,
            line=self.line.kind.label,
            version=version,
            serving=self.serving(),
            reason=reason,
            error=error,
        )

    def accept(self, event: Any) -> bool:
        """Verify an announcement and swap to it; True when the served version changed."""
        verified = self.verify(event)
        if verified is None:
            return False
        swapped = False
        try:
            swapped = self.swap(verified)
        finally:
            self.settle(verified, swapped)
        return swapped

    # --- the Kafka side ----------------------------------------------------------------------------

    def subscribe(self, reader: Any) -> None:
        """Take the reader of the line's topic, positioned at its end (a shared.kafka.readers.TopicFollower
        of ``line.kind.topic``). Made before the service reads the store, so that a version announced
        in between is not missed."""
        self._reader = reader

    def start(self) -> None:
        """Follow the announcements on a daemon thread (after ``subscribe``)."""
        if self._reader is None:
            raise RuntimeError("subscribe() first")
        self._reader.start_thread(lambda env, _record: self.accept(env.payload), f"follow-{self.line.kind.label}")

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.stop_thread()
            self._reader = None

    def close(self) -> None:
        """Stop following and delete the private copies (the service no longer serves them)."""
        self.stop()
        self.private.close()
