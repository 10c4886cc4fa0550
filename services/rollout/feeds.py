"""What the rollout service reads from Kafka: its own steps (to rebuild its state at start) and the
live evidence (ratings and completions) since the canary started.

    events = read_history(kafka)                           # every RolloutEvent on rlhf.rollout, in order
    feed = EvidenceFeed(kafka, since=state.canary_since)   # rlhf.feedback + rlhf.completions from then
    feed.start(handler)                                     # handler(envelope) on a thread
    feed.caught_up.wait()                                   # what was on the topics at start is read

**From a time.** A restarted service must rebuild the evidence its canary collected, and only that
(the gate's decision on the same evidence must be the same): the feed seeks each partition to the
first record written at or after ``since`` minus ``SEEK_SLACK_S`` (Kafka's time index; a broker whose
index is coarse only makes it read a little more), and ``EvidenceFeed.fresh`` lets through only
events whose envelope was produced at or after the canary's start. Without a canary the feed starts
at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from services.rollout import metrics
from shared.config import KafkaConfig
from shared.events import RolloutEvent
from shared.kafka.envelope import Envelope
from shared.kafka.readers import AssignedReader, Partition, decode_or_skip
from shared.kafka.topics import COMPLETIONS, FEEDBACK, ROLLOUT
from shared.logging import get_logger, log_event

log = get_logger(__name__)

SERVICE = "rollout"
SEEK_SLACK_S = 60.0
"""Seek this much before the canary's start: producers' and brokers' clocks differ a little."""


def read_history(kafka: KafkaConfig, *, stop: threading.Event | None = None) -> list[RolloutEvent]:
    """Every RolloutEvent on rlhf.rollout, oldest first (one partition: the order of the steps)."""
    reader = AssignedReader(kafka, SERVICE, [ROLLOUT], start="beginning")
    events: list[RolloutEvent] = []
    try:
        while not (stop and stop.is_set()):
            for record in reader.poll():
                env = decode_or_skip(record, expect=RolloutEvent)
                if env is not None:
                    events.append(env.payload)
            if reader.lag()[ROLLOUT] == 0:
                break
    finally:
        reader.close()
    return events


def start_offsets(ends: dict[Partition, int], found: dict[Partition, int | None]) -> dict[Partition, int]:
    """Where each partition is read from: the offset the time index found, or the end when it found
    none (no record since that time); never beyond the end."""
    out = {}
    for part, end in ends.items():
        at = found.get(part)
        out[part] = end if at is None else min(at, end)
    return out


def offsets_at(
    kafka: KafkaConfig, topics: Iterable[str], since: float
) -> tuple[dict[Partition, int], dict[Partition, int]]:
    """(start offsets at ``since`` - SEEK_SLACK_S, end offsets now) of every partition of ``topics``."""
    consumer = KafkaConsumer(**_consumer_kwargs(kafka))
    try:
        parts = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        ends = {(tp.topic, tp.partition): int(o) for tp, o in consumer.end_offsets(parts).items()}
        at_ms = int(max(0.0, since - SEEK_SLACK_S) * 1000)
        found_raw = consumer.offsets_for_times(dict.fromkeys(parts, at_ms))
        found = {(tp.topic, tp.partition): (None if o is None else int(o.offset)) for tp, o in found_raw.items()}
    finally:
        consumer.close()
    return start_offsets(ends, found), ends


def _consumer_kwargs(kafka: KafkaConfig) -> dict[str, Any]:
    from shared.kafka.client import consumer_kwargs

    return consumer_kwargs(kafka, SERVICE, group_id=None)


class EvidenceFeed:
    """rlhf.feedback and rlhf.completions from a time (or the end) on a daemon thread."""

    def __init__(self, kafka: KafkaConfig, since: float | None):
        self.topics = (FEEDBACK, COMPLETIONS)
        if since:
            starts, ends = offsets_at(kafka, self.topics, since)
        else:
            starts, ends = {}, {}
        self.reader = AssignedReader(kafka, SERVICE, self.topics, start=starts if since else "end")
        self._remaining = {p: end for p, end in ends.items() if end > starts.get(p, end)}
        """Partitions not yet read up to their end as of the start -> that end offset."""
        self.caught_up = threading.Event()
        if not self._remaining:
            self.caught_up.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        log_event(
            log,
            "evidence feed assigned",
            since=round(since, 3) if since else "end",
            to_read=sum(end - starts.get(p, end) for p, end in self._remaining.items()),
        )

    def start(self, handler: Callable[[Envelope], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(handler,), name="rollout-evidence", daemon=True)
        self._thread.start()

    def _run(self, handler: Callable[[Envelope], None]) -> None:
        try:
            while not self._stop.is_set():
                records = self.reader.poll()
                for record in records:
                    env = decode_or_skip(record)
                    if env is not None:
                        try:
                            handler(env)
                        except Exception:  # one bad record must not stop the gate's evidence
                            metrics.EVIDENCE_FAILURES.labels(record.topic).inc()
                            log.exception("evidence handler failed on %s offset %s", record.topic, record.offset)
                    self._passed((record.topic, record.partition), record.offset)
                if not records and not self.caught_up.is_set() and self._lag_is_zero():
                    self.caught_up.set()
        finally:
            self.reader.close()

    def _passed(self, part: Partition, offset: int) -> None:
        end = self._remaining.get(part)
        if end is not None and offset + 1 >= end:
            del self._remaining[part]
            if not self._remaining:
                self.caught_up.set()

    def _lag_is_zero(self) -> bool:
        """A partition whose records before the end were deleted (retention) never shows them."""
        try:
            return not any(self.reader.lag().values())
        except Exception:  # noqa: BLE001 - a metadata hiccup: asked again on the next empty poll
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        else:
            self.reader.close()
