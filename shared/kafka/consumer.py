"""Consuming events: at-least-once group consumers and broadcast followers.

``GroupConsumer`` commits offsets only after the handler has finished with every record of a
batch; a handler error rewinds to the failed record and retries it after a pause, so a crash
between work and commit replays the record (handlers must be idempotent) and nothing is skipped.
Records that are not valid envelopes are counted, logged and skipped: one bad record must not
stall a topic forever.

``TopicFollower`` is for announcements every replica must see (policy updates): no group, all
partitions, starting from the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from shared.config import KafkaConfig
from shared.kafka import envelope
from shared.kafka.client import consumer_kwargs
from shared.kafka.metrics import BAD_RECORDS, EVENTS_CONSUMED, HANDLER_FAILURES
from shared.logging import get_logger, log_event

log = get_logger(__name__)

Handler = Callable[[envelope.Envelope, Any], None]
"""Called with the decoded envelope and the raw kafka-python record."""


def decode_or_skip(record: Any, expect: type | None = None) -> envelope.Envelope | None:
    """The kafka-python record's envelope, or None for a record that is not one (counted and
    logged, so that a bad record never stalls or crashes a reader)."""
    return decode_value_or_skip(record.value, record.topic, record.partition, record.offset, expect)


def decode_value_or_skip(
    value: bytes | None, topic: str, partition: int, offset: int, expect: type | None = None
) -> envelope.Envelope | None:
    """``decode_or_skip`` for a record given by its parts (any client library's record)."""
    try:
        return envelope.decode(value if value is not None else b"", expect=expect)
    except envelope.EnvelopeError as exc:
        BAD_RECORDS.labels(topic).inc()
        log_event(log, "skipping bad record", level=30, topic=topic, partition=partition, offset=offset, error=str(exc))
        return None


class GroupConsumer:
    """A consumer-group member that commits only after its handler has done the work."""

    def __init__(
        self,
        cfg: KafkaConfig,
        service: str,
        group_id: str,
        topics: list[str],
        *,
        poll_timeout_ms: int = 500,
        max_records: int = 100,
        retry_pause_s: float = 1.0,
    ):
        self.group_id = group_id
        self.topics = topics
        self.poll_timeout_ms = poll_timeout_ms
        self.max_records = max_records
        self.retry_pause_s = retry_pause_s
        self._consumer = KafkaConsumer(*topics, **consumer_kwargs(cfg, service, group_id))

    def run(self, handler: Handler, stop: threading.Event) -> None:
        """Poll and handle until ``stop`` is set; then commit what is done and leave the group."""
        try:
            while not stop.is_set():
                self.poll_once(handler)
        finally:
            self._consumer.close(autocommit=False)

    def poll_once(self, handler: Handler) -> int:
        """Handle one polled batch and commit it; returns how many records were handled."""
        batches = self._consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
        handled = 0
        for tp, records in batches.items():
            for record in records:
                env = decode_or_skip(record)
                if env is not None:
                    try:
                        handler(env, record)
                    except Exception:
                        HANDLER_FAILURES.labels(record.topic, self.group_id).inc()
                        log.exception("handler failed; will retry offset %s of %s", record.offset, tp)
                        # Commit what succeeded, rewind to the failure, pause before retrying.
                        self._commit_safely()
                        self._consumer.seek(tp, record.offset)
                        time.sleep(self.retry_pause_s)
                        return handled
                    EVENTS_CONSUMED.labels(record.topic, self.group_id).inc()
                handled += 1
        if batches:
            self._commit_safely()
        return handled

    def _commit_safely(self) -> None:
        try:
            self._consumer.commit()
        except KafkaError as exc:
            # A rebalance took our partitions: the new owner replays from the last commit.
            log_event(log, "commit failed; records will be replayed", level=30, error=str(exc))


def wait_for_partitions(consumer: KafkaConsumer, topic: str, timeout_s: float = 30.0) -> set[int]:
    """The partition numbers of ``topic``, once the consumer's metadata knows them (a fresh client
    may not yet); RuntimeError if the topic has none after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return partitions
        time.sleep(0.2)
    raise RuntimeError(f"topic {topic} has no partitions (does it exist?)")


class TopicFollower:
    """Reads every partition of one topic from its current end onward, without a group."""

    def __init__(self, cfg: KafkaConfig, service: str, topic: str, *, poll_timeout_ms: int = 500):
        self.topic = topic
        self.poll_timeout_ms = poll_timeout_ms
        self._consumer = KafkaConsumer(**consumer_kwargs(cfg, service, group_id=None))
        partitions = wait_for_partitions(self._consumer, topic)
        self._assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        self._consumer.assign(self._assigned)
        self._consumer.seek_to_end(*self._assigned)
        # Resolve positions now so that "from the end" means the end as of construction.
        for tp in self._assigned:
            self._consumer.position(tp)

    def start_thread(self, handler: Handler, name: str) -> None:
        """Run the follower in a daemon thread until ``stop_thread``."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, args=(handler, self._stop), name=name, daemon=True)
        self._thread.start()

    def stop_thread(self, timeout_s: float = 5.0) -> None:
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
            self._thread.join(timeout_s)
            self._thread = None

    def run(self, handler: Handler, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batches = self._consumer.poll(timeout_ms=self.poll_timeout_ms)
                for records in batches.values():
                    for record in records:
                        env = decode_or_skip(record)
                        if env is None:
                            continue
                        try:
                            handler(env, record)
                        except Exception:
                            log.exception("handler failed on %s offset %s", self.topic, record.offset)
                        EVENTS_CONSUMED.labels(record.topic, "follower").inc()
        finally:
            self._consumer.close()
