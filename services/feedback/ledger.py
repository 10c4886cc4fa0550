"""What rlhf.feedback holds, as far as accepting new ratings needs it: each user's live vote per
target and the idempotency keys seen. Rebuilt from the topic at start and kept current by tailing
it, so it survives restarts and sees other replicas' writes (after a short delay) without a
database of its own."""

from __future__ import annotations

import threading
import time

from kafka import KafkaConsumer, TopicPartition

from services.feedback.protocol import SubmitResult
from shared.config import KafkaConfig
from shared.events import FeedbackEvent
from shared.kafka.client import consumer_kwargs
from shared.kafka.consumer import decode_or_skip
from shared.kafka.topics import FEEDBACK
from shared.logging import get_logger, log_event

log = get_logger(__name__)


class FeedbackLedger:
    """Thread-safe: applied from the tailing thread and from the service after its own writes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen_ids: set[str] = set()
        self._live: dict[tuple[str, str], FeedbackEvent] = {}
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
                self._live[(ev.user_id, ev.target)] = ev

    def by_key(self, user_id: str, key: str) -> SubmitResult | None:
        with self._lock:
            return self._by_key.get((user_id, key))

    def live(self, user_id: str, target: str) -> FeedbackEvent | None:
        with self._lock:
            return self._live.get((user_id, target))

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen_ids)


class LedgerFollower:
    """Reads rlhf.feedback from the beginning into a ledger, then keeps tailing it."""

    def __init__(self, cfg: KafkaConfig, ledger: FeedbackLedger):
        self.ledger = ledger
        self.caught_up = threading.Event()
        self._consumer = KafkaConsumer(**consumer_kwargs(cfg, "feedback-ledger", group_id=None))
        partitions = self._consumer.partitions_for_topic(FEEDBACK)
        deadline = time.monotonic() + 30
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = self._consumer.partitions_for_topic(FEEDBACK)
        if not partitions:
            raise RuntimeError(f"topic {FEEDBACK} does not exist")
        self._parts = [TopicPartition(FEEDBACK, p) for p in sorted(partitions)]
        self._consumer.assign(self._parts)
        self._consumer.seek_to_beginning(*self._parts)
        self._end = self._consumer.end_offsets(self._parts)

    def run(self, stop: threading.Event) -> None:
        started = time.monotonic()
        try:
            while not stop.is_set():
                for records in self._consumer.poll(timeout_ms=300).values():
                    for record in records:
                        env = decode_or_skip(record, expect=FeedbackEvent)
                        if env is not None:
                            self.ledger.apply(env.payload)
                if not self.caught_up.is_set() and all(
                        self._consumer.position(tp) >= self._end[tp] for tp in self._parts):
                    self.caught_up.set()
                    log_event(log, "feedback ledger rebuilt", events=len(self.ledger),
                              seconds=round(time.monotonic() - started, 2))
        finally:
            self._consumer.close()
