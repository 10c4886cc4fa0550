"""What rlhf.feedback holds, as far as accepting new ratings needs it: each principal's live vote per
target and the idempotency keys seen. Rebuilt from the topic at start and kept current by tailing
it, so it survives restarts and sees other replicas' writes (after a short delay) without a
database of its own."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import orjson

from services.feedback.domain import SubmitResult
from shared.config import KafkaConfig
from shared.events import FeedbackEvent
from shared.kafka.readers import RdKafkaAssignedReader, decode_or_skip
from shared.kafka.topics import FEEDBACK
from shared.logging import get_logger, log_event

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class LiveVote:
    """What accepting a new rating needs of a principal's live vote on a target.

    Kept small on purpose: the ledger holds one per vote for the life of the process, and holding
    the whole FeedbackEvent (its list, RatedResponse objects, dicts) made every full garbage
    collection walk several objects per vote, stalling the service for tens of milliseconds once it
    held some 100,000 votes. Tuples of strings and numbers are not even tracked by the collector.
    """

    feedback_id: str
    revision: int
    response_ids: tuple[str, ...]
    thumb: str | None
    score: int | None
    preferred: str | None
    ranks: tuple[int, ...] | None
    comment: str
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
            ev.comment,
            tuple(ev.tags),
        )


class FeedbackLedger:
    """Thread-safe: applied from the tailing thread and from the service after its own writes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen_ids: set[str] = set()
        self._live: dict[tuple[str, str], LiveVote] = {}
        self._by_key: dict[tuple[str, str], SubmitResult] = {}

    def apply(self, ev: FeedbackEvent) -> None:
        """Record an event on the topic; applying one twice changes nothing."""
        with self._lock:
            if ev.feedback_id in self._seen_ids:
                return
            self._seen_ids.add(ev.feedback_id)
            if ev.idempotency_key:
                self._by_key[(ev.user_id, ev.idempotency_key)] = SubmitResult(ev.feedback_id, ev.revision, True)
            current = self._live.get((ev.user_id, ev.target))
            if current is None or ev.revision > current.revision:
                self._live[(ev.user_id, ev.target)] = LiveVote.of(ev)

    def has(self, feedback_id: str) -> bool:
        with self._lock:
            return feedback_id in self._seen_ids

    def by_key(self, principal: str, key: str) -> SubmitResult | None:
        with self._lock:
            return self._by_key.get((principal, key))

    def live(self, principal: str, target: str) -> LiveVote | None:
        with self._lock:
            return self._live.get((principal, target))

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen_ids)


class LedgerFollower:
    """Reads rlhf.feedback from the beginning into a ledger, then keeps tailing it.

    It reads every rating the service writes, so it reads with librdkafka (RdKafkaAssignedReader):
    fetching and checking records in C leaves the GIL to the request path.
    """

    def __init__(self, cfg: KafkaConfig, ledger: FeedbackLedger, *, metadata_timeout_s: float = 30.0):
        self.ledger = ledger
        self.caught_up = threading.Event()
        self._reader = RdKafkaAssignedReader(
            cfg, "feedback-ledger", [FEEDBACK], start="beginning", metadata_timeout_s=metadata_timeout_s
        )
        try:
            self._end = self._reader.end_offsets()
        except Exception:
            self._reader.close()
            raise
        self._next = dict.fromkeys(self._end, 0)

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
