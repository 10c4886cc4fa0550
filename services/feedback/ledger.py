"""What rlhf.feedback holds, as far as accepting new ratings needs it: each principal's live vote per
target and the idempotency keys seen. Rebuilt from the topic at start and kept current by tailing
it, so it survives restarts and sees other replicas' writes (after a short delay) without a
database of its own."""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from dataclasses import dataclass

import orjson

from services.feedback import metrics
from services.feedback.domain import SubmitResult
from shared.config import KafkaConfig
from shared.events import FeedbackEvent
from shared.kafka.readers import RdKafkaAssignedReader, decode_or_skip
from shared.kafka.topics import FEEDBACK
from shared.logging import get_logger, log_event

log = get_logger(__name__)

EXPIRE_EVERY_S = 10.0
"""How often the tailing thread makes the ledger forget expired votes (admissions do it too)."""


def comment_digest(comment: str) -> bytes:
    """What the ledger keeps of a comment: 8 bytes of its SHA-256 (b"" for none), enough to tell
    whether a resubmitted vote changed its comment, without keeping the text (up to
    RLHF_FEEDBACK_MAX_COMMENT_CHARS characters per vote) in memory."""
    return hashlib.sha256(comment.encode()).digest()[:8] if comment else b""


@dataclass(frozen=True, slots=True)
class LiveVote:
    """What accepting a new rating needs of a principal's live vote on a target.

    Kept small on purpose: the ledger holds one per vote while it may still change, and holding
    the whole FeedbackEvent (its list, RatedResponse objects, dicts) made every full garbage
    collection walk several objects per vote, stalling the service for tens of milliseconds once it
    held some 100,000 votes. Tuples of strings and numbers are not even tracked by the collector.
    The comment is kept as a digest only (``comment_digest``).
    """

    feedback_id: str
    revision: int
    response_ids: tuple[str, ...]
    thumb: str | None
    score: int | None
    preferred: str | None
    ranks: tuple[int, ...] | None
    comment: bytes
    """``comment_digest`` of the comment."""
    tags: tuple[str, ...]

    @classmethod
    def of(cls, ev: FeedbackEvent) -> LiveVote:
        return cls(
            ev.feedback_id,
            ev.revision,
            tuple(r.response_id for r in ev.responses),
            ev.thumb,
            ev.score,
            ev.preferred,
            tuple(ev.ranks) if ev.ranks is not None else None,
            comment_digest(ev.comment),
            tuple(ev.tags),
        )


def forget_before(now: float, token_ttl_s: float, slack_s: float) -> float:
    """The ledger forgets votes received before this time:

        now - token_ttl_s - slack_s

    A vote is received while the tokens it carries are valid, and those were issued before it, so
    every token for its responses has expired by received_at + token_ttl_s: no valid rating can
    retry it or change it after that, and what the ledger knew about it can no longer matter.
    ``slack_s`` covers clock skew between the gateway that issued the tokens and this service."""
    return now - token_ttl_s - slack_s


@dataclass(frozen=True, slots=True)
class _Entry:
    received_at: float
    vote: tuple[str, str]
    """(principal, target)."""
    key: tuple[str, str] | None
    """(principal, idempotency key), when the rating had one."""


class FeedbackLedger:
    """Thread-safe: applied from the tailing thread and from the service after its own writes.

    Bounded: it forgets votes received before ``forget_before`` (their tokens have expired) and
    holds at most ``max_votes`` ratings; when full, a new one evicts the oldest. Evicting a live vote
    that could still change loses its revision, so the ledger keeps the highest revision it ever
    evicted as a floor: a vote on a target it does not know is numbered above it
    (``next_revision``), and a revision never goes backwards.
    """

    def __init__(
        self, *, token_ttl_s: float = 7 * 24 * 3600, slack_s: float = 300.0, max_votes: int = 1_000_000
    ) -> None:
        if max_votes < 1:
            raise ValueError("max_votes must be at least 1")
        self.token_ttl_s = token_ttl_s
        self.slack_s = slack_s
        self.max_votes = max_votes
        self._lock = threading.Lock()
        # feedback_id -> entry, oldest received first (the topic's order; a late record goes last).
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._live: dict[tuple[str, str], LiveVote] = {}
        self._by_key: dict[tuple[str, str], SubmitResult] = {}
        self._evicted_revision = 0  # the highest revision of a live vote evicted before it expired
        metrics.LEDGER_CAPACITY.set(max_votes)

    def apply(self, ev: FeedbackEvent, now: float | None = None) -> None:
        """Record an event on the topic; applying one twice changes nothing. One received before
        ``forget_before`` is not recorded; at ``max_votes`` the oldest is evicted to make room."""
        now = time.time() if now is None else now
        with self._lock:
            if ev.feedback_id in self._entries:
                return
            horizon = forget_before(now, self.token_ttl_s, self.slack_s)
            self._expire(horizon)
            if ev.received_at < horizon:
                return  # its tokens have expired: nothing can retry or change it
            while len(self._entries) >= self.max_votes:
                self._drop_oldest(evicted=True)
                metrics.LEDGER_EVICTED.inc()
            vote = (ev.user_id, ev.target)
            key = (ev.user_id, ev.idempotency_key) if ev.idempotency_key else None
            self._entries[ev.feedback_id] = _Entry(ev.received_at, vote, key)
            if key is not None:
                self._by_key[key] = SubmitResult(ev.feedback_id, ev.revision, True)
            current = self._live.get(vote)
            if current is None or ev.revision > current.revision:
                self._live[vote] = LiveVote.of(ev)
            metrics.LEDGER_VOTES.set(len(self._entries))

    def next_revision(self, live: LiveVote | None) -> int:
        """The revision of a new vote on a target whose live vote is ``live``:

            live.revision + 1             when the ledger holds the live vote
            1 + highest evicted revision  when it does not (1 when nothing was ever evicted)

        The target's own vote may have been evicted, and its revision was at most that floor."""
        if live is not None:
            return live.revision + 1
        with self._lock:
            return self._evicted_revision + 1

    def expire(self, now: float | None = None) -> int:
        """Forget what was received before ``forget_before``; returns how many ratings."""
        now = time.time() if now is None else now
        with self._lock:
            return self._expire(forget_before(now, self.token_ttl_s, self.slack_s))

    def _expire(self, horizon: float) -> int:
        dropped = 0
        while self._entries and next(iter(self._entries.values())).received_at < horizon:
            self._drop_oldest()
            dropped += 1
        if dropped:
            metrics.LEDGER_EXPIRED.inc(dropped)
            metrics.LEDGER_VOTES.set(len(self._entries))
        return dropped

    def _drop_oldest(self, evicted: bool = False) -> None:
        feedback_id, entry = self._entries.popitem(last=False)
        live = self._live.get(entry.vote)
        if live is not None and live.feedback_id == feedback_id:
            del self._live[entry.vote]
            if evicted:  # it could still change: the next vote on its target must number above it
                self._evicted_revision = max(self._evicted_revision, live.revision)
        if entry.key is not None:
            seen = self._by_key.get(entry.key)
            if seen is not None and seen.feedback_id == feedback_id:
                del self._by_key[entry.key]

    def has(self, feedback_id: str) -> bool:
        with self._lock:
            return feedback_id in self._entries

    def by_key(self, principal: str, key: str) -> SubmitResult | None:
        with self._lock:
            return self._by_key.get((principal, key))

    def live(self, principal: str, target: str) -> LiveVote | None:
        with self._lock:
            return self._live.get((principal, target))

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class LedgerFollower:
    """Reads rlhf.feedback from the beginning into a ledger, then keeps tailing it.

    It reads every rating the service writes, so it reads with librdkafka (RdKafkaAssignedReader):
    fetching and checking records in C leaves the GIL to the request path.
    """

    def __init__(self, cfg: KafkaConfig, ledger: FeedbackLedger, *, metadata_timeout_s: float = 30.0):
        self.ledger = ledger
        self.caught_up = threading.Event()
        # Only what the ledger would keep is replayed: the records since its horizon (bounded).
        since = forget_before(time.time(), ledger.token_ttl_s, ledger.slack_s)
        self._reader = RdKafkaAssignedReader(
            cfg,
            "feedback-ledger",
            [FEEDBACK],
            start="beginning",
            metadata_timeout_s=metadata_timeout_s,
            since_s=max(0.0, since),
        )
        try:
            self._end = self._reader.end_offsets()
        except Exception:
            self._reader.close()
            raise
        self._next = {p: self._reader.start_offsets.get(p, 0) for p in self._end}
        self._expired_at = time.monotonic()

    def _applied_already(self, value: bytes | None) -> bool:
        """True for a record whose rating the ledger holds already, mostly this replica's own
        writes (applied when Kafka acknowledged them). Applying it again would change nothing, and
        the full envelope check costs most of this reader's CPU; any other record gets that check."""
        if value is None:
            return False
        try:
            feedback_id = orjson.loads(value)["payload"]["feedback_id"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return False
        return isinstance(feedback_id, str) and self.ledger.has(feedback_id)

    def run(self, stop: threading.Event) -> None:
        started = time.monotonic()
        try:
            while not stop.is_set():
                for record in self._reader.poll():
                    self._next[(record.topic, record.partition)] = record.offset + 1
                    if self._applied_already(record.value):
                        continue
                    env = decode_or_skip(record, expect=FeedbackEvent)
                    if env is not None:
                        self.ledger.apply(env.payload)
                if time.monotonic() - self._expired_at >= EXPIRE_EVERY_S:
                    self.ledger.expire()
                    self._expired_at = time.monotonic()
                if not self.caught_up.is_set() and all(self._next[p] >= end for p, end in self._end.items()):
                    self.caught_up.set()
                    log_event(
                        log,
                        "feedback ledger rebuilt",
                        events=len(self.ledger),
                        seconds=round(time.monotonic() - started, 2),
                    )
        finally:
            self._reader.close()
