"""A version line: the versions of one model family as they are published, announced, followed,
verified and swapped in. The trainer publishes the ``policy`` line, the reward learner the ``rm``
line; inference replicas follow the first, reward scorers the second.

Publishing side (one publisher per line):

    line = VersionLine(store, POLICY, KafkaAnnouncer(KafkaPublisher(kafka, "trainer"), POLICY))
    manifest = line.publish(out_dir, parent="policy-0002", metrics={...}, extra={...})  # atomic, current
    ...                                   # record what the publisher must remember (checkpoint, SQLite)
    line.announce_pending()               # then tell the followers (acks=all); False: still owed
    line.set_current("policy-0002")       # a rollback: announced by the next announce_pending()

**The announcement owed is durable by construction.** The store's ``<line>.current`` pointer says
which version is current; ``<line>.announced`` records the last version Kafka acknowledged. While
they differ an announcement is owed (``pending_announcement``), whoever crashed where: a publisher
killed between ``publish`` and ``announce_pending`` finds it owed on restart and sends it. Sending
twice is harmless (followers ignore the version they serve). The reason is derived, not stored: a
current version older than the announced one is a rollback, anything else a publish. A line
without an announcer (offline tools: ``rlhf bootstrap``, ``rlhf train-rm``) owes nothing: what it
makes current is recorded as settled, since replicas that start later read the store's current.

Following side (every replica):

    follower = VersionFollower(line, serving=lambda: scorer.version, swap=scorer.swap_to,
                               refused=metrics.SWAP_REFUSED, check=None)
    follower.subscribe(TopicFollower(kafka, "reward", REWARD_MODEL.topic))  # at the end, BEFORE store.current()
    scorer.load(store.current("rm"))      # so that an announcement made in between is not missed
    follower.start()                      # a thread: announcement -> verify -> swap
    follower.accept(event)                # what that thread does with each announcement

``verify`` refuses (counts in ``refused`` by reason, logs, returns None) an announcement whose
version is not of the line, does not verify against its manifest (sha256 of every file), whose
manifest is not the announced one, or that the service's ``check`` rejects (e.g. inference: the
weights cannot replace the served ones in place). Only a verified version reaches ``swap``.

A line is described by a ``LineKind`` (its store line name, topic, event type and Kafka key), so a
new kind of version (LoRA adapters, canary versions) is one more ``LineKind`` on the same machinery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from shared.events import PolicyUpdateEvent, RewardModelEvent
from shared.kafka.topics import POLICY_UPDATES, REWARD_MODELS
from shared.logging import get_logger, log_event
from shared.model_store import Manifest, ModelStore, ModelStoreError, version_number

log = get_logger(__name__)

ANNOUNCE_FAILURES = Counter(
    "rlhf_version_announce_failures_total", "Announcements Kafka did not acknowledge (retried)", ["line"]
)
ANNOUNCEMENT_OWED = Gauge(
    "rlhf_version_announcement_owed", "1 while the line's current version is not yet announced", ["line"]
)
ANNOUNCED = Counter("rlhf_version_announced_total", "Versions announced, by line and reason", ["line", "reason"])


@dataclass(frozen=True)
class LineKind:
    """What makes a family of versions a line: where it lives and how it is announced."""

    name: str
    """The model store line (versions are ``<name>-NNNN``)."""
    topic: str
    """Where its versions are announced."""
    event_type: type[Any]
    """The announcement payload: built by ``make_event``, the only type a follower accepts."""
    make_event: Callable[[str, str, str | None, str, dict[str, float]], Any]
    """(version, manifest sha256, parent, reason, metrics) -> the announcement."""

    @property
    def key(self) -> str:
        """Kafka key of every announcement of the line: one partition, so they stay in order."""
        return self.name


POLICY = LineKind(
    "policy",
    POLICY_UPDATES,
    PolicyUpdateEvent,
    lambda version, sha, parent, reason, metrics: PolicyUpdateEvent(
        version=version, manifest_sha256=sha, parent=parent, reason=reason, metrics=metrics
    ),
)
REWARD_MODEL = LineKind(
    "rm",
    REWARD_MODELS,
    RewardModelEvent,
    lambda version, sha, parent, reason, metrics: RewardModelEvent(
        version=version, manifest_sha256=sha, parent=parent, metrics=metrics, reason=reason
    ),
)


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
class VerifiedVersion:
    """A version whose files matched its manifest, and whose manifest was the announced one."""

    version: str
    path: Path
    manifest: Manifest
    manifest_sha256: str
    reason: str = "publish"


class VersionRefused(Exception):
    """An announced version that may not be swapped in; ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class VersionLine:
    """One line of the model store, with its announcements."""

    def __init__(self, store: ModelStore, kind: LineKind, announcer: Announcer | None = None):
        self.store = store
        self.kind = kind
        self.announcer = announcer
        """None: nothing is announced (offline publishes); what is owed stays owed in the store."""

    # --- publishing ------------------------------------------------------------------------------

    def publish(
        self,
        src_dir: Path,
        *,
        parent: str | None = None,
        metrics: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
        make_current: bool = True,
    ) -> Manifest:
        """Copy ``src_dir`` into the store as the line's next version (atomic, sha256 manifest) and
        make it current; its announcement is then owed until ``announce_pending`` succeeds."""
        manifest = self.store.publish(
            self.kind.name, src_dir, parent=parent, metrics=metrics, extra=extra, make_current=make_current
        )
        log_event(log, "published", line=self.kind.name, version=manifest.version, parent=parent or "")
        if make_current:
            self._settle_if_offline(manifest.version)
        self._show_owed(self.pending_announcement())
        return manifest

    def set_current(self, version: str) -> Manifest:
        """Make an existing version current again (a rollback; verified first); announcement owed."""
        self.store.set_current(self.kind.name, version)
        self._settle_if_offline(version)
        self._show_owed(self.pending_announcement())
        return self.store.manifest(version)

    def announced(self) -> str | None:
        """The last version Kafka acknowledged an announcement of (None: none yet)."""
        doc = self.store.read_line_record(self.kind.name, "announced")
        version = doc.get("version") if doc else None
        return version if isinstance(version, str) else None

    def pending_announcement(self) -> PendingAnnouncement | None:
        """The announcement owed: the current version when it is not the last one announced."""
        current = self.store.current(self.kind.name)
        announced = self.announced()
        if current is None or current == announced:
            return None
        older = announced is not None and version_number(current) < version_number(announced)
        return PendingAnnouncement(current, "rollback" if older else "publish")

    def announce_pending(self) -> Any | None:
        """Send the announcement owed, if any, and record it once acknowledged. Returns the event
        sent; None when nothing was owed, or when sending failed (logged, counted, still owed)."""
        pending = self.pending_announcement()
        if pending is None or self.announcer is None:
            self._show_owed(pending)
            return None
        manifest = self.store.manifest(pending.version)
        sha = self.store.manifest_sha256(pending.version)
        event = self.kind.make_event(pending.version, sha, manifest.parent, pending.reason, dict(manifest.metrics))
        try:
            self.announcer.announce(event)
        except Exception as exc:  # noqa: BLE001 - any producer error: the announcement stays owed
            ANNOUNCE_FAILURES.labels(self.kind.name).inc()
            self._show_owed(pending)
            log_event(
                log,
                "announcement failed; it stays owed and is retried",
                level=30,
                line=self.kind.name,
                version=pending.version,
                error=f"{type(exc).__name__}: {exc}",
            )
            return None
        self._record_announced(pending.version, sha)
        ANNOUNCED.labels(self.kind.name, pending.reason).inc()
        self._show_owed(None)
        log_event(log, "announced", line=self.kind.name, version=pending.version, reason=pending.reason)
        return event

    def _record_announced(self, version: str, sha: str) -> None:
        self.store.write_line_record(self.kind.name, "announced", {"version": version, "manifest_sha256": sha})

    def _settle_if_offline(self, version: str) -> None:
        if self.announcer is None:
            self._record_announced(version, self.store.manifest_sha256(version))

    def _show_owed(self, pending: PendingAnnouncement | None) -> None:
        ANNOUNCEMENT_OWED.labels(self.kind.name).set(1 if pending else 0)

    # --- following -------------------------------------------------------------------------------

    def verify_announced(self, event: Any, check: Callable[[VerifiedVersion], None] | None = None) -> VerifiedVersion:
        """The announced version, verified: of this line, every file matching the manifest, the
        manifest the announced one, and accepted by ``check``. Raises VersionRefused or
        ModelStoreError (whose class name is the refusal reason)."""
        if not isinstance(event, self.kind.event_type):
            raise VersionRefused("wrong_event", f"{type(event).__name__} is not an announcement of {self.kind.name}")
        version = event.version
        try:
            line_ok = version.rsplit("-", 1)[0] == self.kind.name and version_number(version) > 0
        except (ModelStoreError, AttributeError):
            line_ok = False
        if not line_ok:
            raise VersionRefused("wrong_line", f"{version!r} is not a version of the {self.kind.name} line")
        manifest = self.store.verify(version)
        actual = self.store.manifest_sha256(version)
        if actual != event.manifest_sha256:
            raise VersionRefused(
                "manifest_mismatch",
                f"{version}: manifest sha256 {actual[:12]}… does not match the announced {event.manifest_sha256[:12]}…",
            )
        verified = VerifiedVersion(version, self.store.path(version), manifest, actual, getattr(event, "reason", ""))
        if check is not None:
            check(verified)
        return verified


@dataclass
class VersionFollower:
    """A replica's side of a line: verify each announcement, hand verified versions to ``swap``."""

    line: VersionLine
    serving: Callable[[], str]
    """The version the replica serves now (an announcement of it is ignored)."""
    swap: Callable[[VerifiedVersion], bool]
    """Serve the verified version from now on; True when the served version changed."""
    refused: Any
    """The service's Counter of refused versions, labelled by reason."""
    check: Callable[[VerifiedVersion], None] | None = None
    """Service-specific acceptance (raise ValueError, a subclass, or VersionRefused to refuse)."""
    refusals: int = 0
    _reader: Any = field(default=None, repr=False)

    def verify(self, event: Any) -> VerifiedVersion | None:
        """The verified version, or None: already served (not counted) or refused (counted, logged)."""
        version = getattr(event, "version", None)
        if version is not None and version == self.serving():
            return None
        try:
            return self.line.verify_announced(event, self.check)
        except VersionRefused as exc:
            self.refuse(str(version), exc.reason, str(exc))
        except (ModelStoreError, ValueError, OSError) as exc:
            self.refuse(str(version), type(exc).__name__, str(exc))
        return None

    def refuse(self, version: str, reason: str, error: str) -> None:
        """Count and log a version that will not be served (verification or loading failed)."""
        self.refusals += 1
        self.refused.labels(reason).inc()
        log_event(
            log,
            "refused an announced version; still serving the old one",
            level=40,
            line=self.line.kind.name,
            version=version,
            serving=self.serving(),
            reason=reason,
            error=error,
        )

    def accept(self, event: Any) -> bool:
        """Verify an announcement and swap to it; True when the served version changed."""
        verified = self.verify(event)
        return verified is not None and self.swap(verified)

    # --- the Kafka side ----------------------------------------------------------------------------

    def subscribe(self, reader: Any) -> None:
        """Take the reader of the line's topic, positioned at its end (a shared.kafka.readers.TopicFollower
        of ``line.kind.topic``). Made before the service reads the store's current version, so that
        a version announced in between is not missed."""
        self._reader = reader

    def start(self) -> None:
        """Follow the announcements on a daemon thread (after ``subscribe``)."""
        if self._reader is None:
            raise RuntimeError("subscribe() first")
        self._reader.start_thread(lambda env, _record: self.accept(env.payload), f"follow-{self.line.kind.name}")

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.stop_thread()
            self._reader = None
