"""Reading events: two reader shapes, a group reader and an assigned reader, and nothing else.

    GroupReader(kafka, "trainer", "rlhf-trainer", [COMPLETIONS]).run(handler, stop)  # a consumer group
    reader = AssignedReader(kafka, "reward-learner", [FEEDBACK, COMPLETIONS], start=stored_offsets)
    for record in reader.poll(): env = decode_or_skip(record)                         # every partition, ours
    TopicFollower(kafka, "inference", POLICY_UPDATES).start_thread(handler, "follow") # from the end, on a thread

``GroupReader`` is an at-least-once consumer-group member: it commits offsets only after its handler
has finished with every record of a batch; a handler error rewinds to the failed record and retries
it after a pause, so a crash between work and commit replays the record (handlers must be
idempotent) and nothing is skipped.

``AssignedReader`` has no group: it assigns itself every partition of its topics and starts each at
the beginning, at the end, or at an offset the caller stored itself (the reward learner stores its
offsets in the same SQLite transaction as the records). A stored offset beyond a partition's end
means the topic was recreated (the embedded, memory-only broker restarted): that partition is read
from the beginning. ``RdKafkaAssignedReader`` is the same reader on librdkafka (confluent-kafka), used
where one process reads thousands of records a second (the feedback service's ledger).

Records that are not valid envelopes are counted, logged and skipped by ``decode_or_skip``: one bad
record must not stall or crash a reader.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple, TypeVar

import confluent_kafka
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from shared.config import KafkaConfig
from shared.kafka import envelope
from shared.kafka.client import consumer_kwargs, rdkafka_consumer_config
from shared.kafka.metrics import BAD_RECORDS, EVENTS_CONSUMED, HANDLER_FAILURES
from shared.logging import get_logger, log_event

log = get_logger(__name__)

Partition = tuple[str, int]
"""(topic, partition number)."""
Start = Literal["beginning", "end"] | Mapping[Partition, int]
"""Where an AssignedReader starts: every partition at its beginning or end, or at stored offsets
(partitions without one: the beginning)."""


class Record(NamedTuple):
    """One record as every reader hands it out, whichever client read it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


Handler = Callable[[envelope.Envelope, Record], None]
"""Called with the decoded envelope and the record it came from."""


def decode_or_skip(record: Record, expect: type | None = None) -> envelope.Envelope | None:
    """The record's envelope, or None for a record that is not one (counted and logged)."""
    try:
        return envelope.decode(record.value if record.value is not None else b"", expect=expect)
    except envelope.EnvelopeError as exc:
        BAD_RECORDS.labels(record.topic).inc()
        log_event(
            log,
            "skipping bad record",
            level=30,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error=str(exc),
        )
        return None


def _record(r: Any) -> Record:  # a kafka-python ConsumerRecord (untyped)
    return Record(r.topic, r.partition, r.offset, r.key, r.value)


# --- the group reader --------------------------------------------------------------------------------


class GroupReader:
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
            for raw in records:
                record = _record(raw)
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


# --- the assigned reader -----------------------------------------------------------------------------


def start_offset(stored: int | None, end: int) -> int | None:
    """Where a partition with ``end`` records is read from, given the offset stored for it: None
    (the beginning) without one, or when it lies beyond the end (the topic was recreated)."""
    return stored if stored is not None and stored <= end else None


class AssignedReader:
    """Every partition of ``topics``, assigned (no group), on kafka-python."""

    def __init__(
        self,
        cfg: KafkaConfig,
        service: str,
        topics: Iterable[str],
        *,
        start: Start = "beginning",
        poll_timeout_ms: int = 500,
        max_records: int = 1000,
        metadata_timeout_s: float = 30.0,
    ):
        self.topics = tuple(topics)
        self.poll_timeout_ms = poll_timeout_ms
        self.max_records = max_records
        self._consumer = KafkaConsumer(**consumer_kwargs(cfg, service, group_id=None))
        self._parts: list[TopicPartition] = []
        for topic in self.topics:
            numbers = _wait_for(
                functools.partial(self._consumer.partitions_for_topic, topic), topic, metadata_timeout_s
            )
            self._parts += [TopicPartition(topic, p) for p in sorted(numbers)]
        self._consumer.assign(self._parts)
        if start == "end":
            self._consumer.seek_to_end(*self._parts)
            for tp in self._parts:  # resolve now: "the end" means the end as of construction
                self._consumer.position(tp)
        elif start == "beginning":
            self._consumer.seek_to_beginning(*self._parts)
        else:
            self._seek_stored(start)

    def _seek_stored(self, stored: Mapping[Partition, int]) -> None:
        ends = self._consumer.end_offsets(self._parts)
        resumed = 0
        for tp in self._parts:
            kept = stored.get((tp.topic, tp.partition))
            offset = start_offset(kept, ends[tp])
            if kept is not None and offset is None:
                log_event(
                    log,
                    "topic is behind the stored offset (recreated?): reading it from the start",
                    level=30,
                    topic=tp.topic,
                    partition=tp.partition,
                    stored=kept,
                    end=ends[tp],
                )
            if offset is None:
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, offset)
                resumed += 1
        log_event(
            log,
            "reader assigned",
            partitions=len(self._parts),
            resumed=resumed,
            from_beginning=len(self._parts) - resumed,
        )

    @property
    def partitions(self) -> list[Partition]:
        return [(tp.topic, tp.partition) for tp in self._parts]

    def poll(self) -> list[Record]:
        """The next records (at most ``max_records``), in offset order within each partition."""
        batches = self._consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
        return [_record(r) for records in batches.values() for r in records]

    def seek(self, partition: Partition, offset: int) -> None:
        """Read ``partition`` again from ``offset`` (e.g. a batch that could not be stored)."""
        self._consumer.seek(TopicPartition(*partition), offset)

    def lag(self) -> dict[str, int]:
        """Records not yet read, per topic (end offsets minus positions)."""
        ends = self._consumer.end_offsets(self._parts)
        out = dict.fromkeys(self.topics, 0)
        for tp in self._parts:
            out[tp.topic] += max(0, ends[tp] - self._consumer.position(tp))
        return out

    def close(self) -> None:
        self._consumer.close()


class RdKafkaAssignedReader:
    """``AssignedReader`` on librdkafka: fetching in C leaves the GIL to the request path of a
    process that reads every record it writes (the feedback ledger)."""

    def __init__(
        self,
        cfg: KafkaConfig,
        service: str,
        topics: Iterable[str],
        *,
        start: Start = "beginning",
        max_records: int = 1000,
        poll_timeout_s: float = 0.3,
        metadata_timeout_s: float = 30.0,
    ):
        self.topics = tuple(topics)
        self.max_records = max_records
        self.poll_timeout_s = poll_timeout_s
        self.metadata_timeout_s = metadata_timeout_s
        # librdkafka's own log lines through our logging rather than its format on stderr.
        self._consumer = confluent_kafka.Consumer(rdkafka_consumer_config(cfg, service), logger=get_logger("rdkafka"))
        try:
            self._parts = [(t, p) for t in self.topics for p in self._partitions_of(t)]
            ends = self.end_offsets()
        except Exception:
            self._consumer.close()
            raise
        assigned = []
        for part in self._parts:
            if start == "end":
                offset = ends[part]
            elif start == "beginning":
                offset = confluent_kafka.OFFSET_BEGINNING
            else:
                kept = start_offset(start.get(part), ends[part])
                offset = confluent_kafka.OFFSET_BEGINNING if kept is None else kept
            assigned.append(confluent_kafka.TopicPartition(part[0], part[1], offset))
        self._consumer.assign(assigned)

    def _partitions_of(self, topic: str) -> list[int]:
        deadline = time.monotonic() + self.metadata_timeout_s

        def listed() -> list[int] | None:
            try:
                meta = self._consumer.list_topics(topic, timeout=max(0.5, deadline - time.monotonic())).topics[topic]
            except confluent_kafka.KafkaException:
                return None  # broker not reachable yet
            return sorted(meta.partitions) if meta.error is None and meta.partitions else None

        return _wait_for(listed, topic, self.metadata_timeout_s)

    @property
    def partitions(self) -> list[Partition]:
        return list(self._parts)

    def end_offsets(self) -> dict[Partition, int]:
        return {
            (t, p): self._consumer.get_watermark_offsets(
                confluent_kafka.TopicPartition(t, p), timeout=self.metadata_timeout_s
            )[1]
            for t, p in self._parts
        }

    def poll(self) -> list[Record]:
        out = []
        for msg in self._consumer.consume(num_messages=self.max_records, timeout=self.poll_timeout_s):
            error = msg.error()
            if error is not None:
                log_event(log, "read error", level=30, topics=",".join(self.topics), error=error.str())
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None  # set on every record
            out.append(Record(topic, partition, offset, msg.key(), msg.value()))
        return out

    def close(self) -> None:
        self._consumer.close()


PartitionNumbers = TypeVar("PartitionNumbers", bound=Iterable[int])


def _wait_for(get: Callable[[], PartitionNumbers | None], topic: str, timeout_s: float) -> PartitionNumbers:
    """``get()`` once it returns partitions (a fresh client may not know them yet); RuntimeError
    when the topic has none after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        partitions = get()
        if partitions:
            return partitions
        if time.monotonic() >= deadline:
            raise RuntimeError(f"topic {topic} has no partitions (does it exist? is the broker reachable?)")
        time.sleep(0.2)


# --- following a topic on a thread -------------------------------------------------------------------


class TopicFollower:
    """An AssignedReader of one topic from its current end, run on a daemon thread: for
    announcements every replica must see (policy and reward model versions)."""

    def __init__(self, cfg: KafkaConfig, service: str, topic: str, *, poll_timeout_ms: int = 500):
        self.topic = topic
        self._reader = AssignedReader(cfg, service, [topic], start="end", poll_timeout_ms=poll_timeout_ms)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_thread(self, handler: Handler, name: str) -> None:
        """Hand every announcement from now on to ``handler`` on a daemon thread, until ``stop_thread``."""
        self._thread = threading.Thread(target=self._run, args=(handler,), name=name, daemon=True)
        self._thread.start()

    def stop_thread(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout_s)
            self._thread = None
        else:
            self._reader.close()

    def _run(self, handler: Handler) -> None:
        try:
            while not self._stop.is_set():
                for record in self._reader.poll():
                    env = decode_or_skip(record)
                    if env is None:
                        continue
                    try:
                        handler(env, record)
                    except Exception:
                        log.exception("handler failed on %s offset %s", self.topic, record.offset)
                    EVENTS_CONSUMED.labels(record.topic, "follower").inc()
        finally:
            self._reader.close()
