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
offsets in the same SQLite transaction as the records). ``RdKafkaAssignedReader`` is the same reader
on librdkafka (confluent-kafka), used where one process reads thousands of records a second (the
feedback service's ledger).

A recreated topic (the embedded, memory-only broker restarted; an operator deleted it) starts again
at offset 0, so a stored offset may point into the middle of records it never covered. Readers tell
topics apart by their *identity* (``partition_identity``): the topic id Kafka assigns each topic
(metadata v10+, KIP-516) when the broker reports one, otherwise the offset and timestamp of the
partition's first record. A caller that stores offsets stores the identities with them
(``AssignedReader.identities``) and hands both back: a partition whose identity changed is read from
its beginning, whatever its offsets. While running, the reader checks the identities every
``identity_check_s`` (when set) and starts a partition over when its topic was recreated
underneath it. Without
stored identities, a stored offset beyond a partition's end is the only sign (read from the
beginning); one within it is trusted.

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
from shared.kafka.metrics import BAD_RECORDS, EVENTS_CONSUMED, HANDLER_FAILURES, RECREATED
from shared.logging import get_logger, log_event

log = get_logger(__name__)

Partition = tuple[str, int]
"""(topic, partition number)."""
Start = Literal["beginning", "end"] | Mapping[Partition, int]
"""Where an AssignedReader starts: every partition at its beginning or end, or at stored offsets
(partitions without one: the beginning)."""
Identities = Mapping[Partition, str]
"""Per partition, the identity of the topic it belonged to (``partition_identity``)."""
EMPTY = "empty"
"""The identity of a partition without a topic id and without records: nothing to tell it by."""


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


def start_offset(stored: int | None, end: int, *, recreated: bool = False) -> int | None:
    """Where a partition with ``end`` records is read from, given the offset stored for it: None
    (the beginning) without one, when its topic was recreated since (``recreated``: see
    ``was_recreated``), or when it lies beyond the end (recreated, told by the offsets alone)."""
    return stored if stored is not None and stored <= end and not recreated else None


def partition_identity(topic_id: str | None, first: tuple[int, int] | None) -> str:
    """What tells one incarnation of a topic's partition from another:

        "id:<topic id>"                   the topic id, when the broker reports a non-zero one
        "first:<offset>:<timestamp ms>"   else the offset and timestamp of its first record
        "empty"                           else (no records: nothing to tell it by)

    A recreated topic gets a new id, and its first record is a new one (written later)."""
    if topic_id and topic_id.strip("0-"):
        return f"id:{topic_id}"
    if first is not None:
        return f"first:{first[0]}:{first[1]}"
    return EMPTY


def was_recreated(stored: str | None, current: str) -> bool:
    """True when a partition stored under identity ``stored`` now belongs to another topic
    incarnation. An unknown (None) or ``EMPTY`` identity, or two of different kinds (a topic id and
    a first record), prove nothing: False (the offsets decide, as ``start_offset`` does without
    identities). A first record that changed can also mean that retention removed the old one:
    reading again from the beginning is then merely redundant."""
    if stored is None or EMPTY in (stored, current) or _kind(stored) != _kind(current):
        return False
    return stored != current


def _kind(identity: str) -> str:
    return identity.split(":", 1)[0]


def carried_identity(previous: str | None, current: str) -> str:
    """The identity kept for a partition known as ``previous`` when ``current`` is read: the one
    that says more (a topic id over a first record over ``EMPTY``; ``current`` when they are of one
    kind). So ``EMPTY`` (the broker could not say, or a recreated partition has no record yet) or a
    moment of metadata without the topic id never erases what told the topic apart."""
    if previous is None or _RANK[_kind(current)] >= _RANK[_kind(previous)]:
        return current
    return previous


_RANK = {EMPTY: 0, "first": 1, "id": 2}


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
        identities: Identities | None = None,
        identity_check_s: float = 0.0,
    ):
        """``identities``: those stored with ``start``'s offsets (see the module docstring);
        ``identity_check_s``: how often a running reader looks for recreated topics (0: never; a
        reader that stores offsets sets it, the reward learner's every 5 s)."""
        self.topics = tuple(topics)
        self.poll_timeout_ms = poll_timeout_ms
        self.max_records = max_records
        self.identity_check_s = identity_check_s
        self._consumer = KafkaConsumer(**consumer_kwargs(cfg, service, group_id=None))
        self._parts: list[TopicPartition] = []
        for topic in self.topics:
            numbers = _wait_for(
                functools.partial(self._consumer.partitions_for_topic, topic), topic, metadata_timeout_s
            )
            self._parts += [TopicPartition(topic, p) for p in sorted(numbers)]
        self._consumer.assign(self._parts)
        self._identities = self._read_identities()
        self._checked_at = time.monotonic()
        self._check_failing = False
        if start == "end":
            self._consumer.seek_to_end(*self._parts)
            for tp in self._parts:  # resolve now: "the end" means the end as of construction
                self._consumer.position(tp)
        elif start == "beginning":
            self._consumer.seek_to_beginning(*self._parts)
        else:
            self._seek_stored(start, identities or {})

    @property
    def identities(self) -> dict[Partition, str]:
        """The identity of each partition's topic as last read: store it with the offsets."""
        return dict(self._identities)

    def _refresh_metadata(self, timeout_ms: int = 2000) -> None:
        """Fetch the cluster metadata again (bounded), so that a recreated topic's new id is seen.
        kafka-python has no public call for it: its own refresh, through its internals, skipped
        when they are not there (the cached metadata is used then)."""
        consumer = self._consumer
        cluster, manager = getattr(consumer, "_cluster", None), getattr(consumer, "_manager", None)
        if cluster is None or manager is None or not hasattr(cluster, "request_update"):
            return
        manager.run(manager.wait_for, cluster.request_update(), timeout_ms)

    def _read_identities(self) -> dict[Partition, str]:
        """Each partition's ``partition_identity``: the topic id from the client's metadata, or its
        first record's offset and timestamp (one ListOffsets request, bounded by the request timeout)."""
        cluster = getattr(self._consumer, "_cluster", None)  # kafka-python keeps topic ids there
        ids: dict[str, str | None] = {}
        for topic in self.topics:
            found = cluster.topic_id(topic) if cluster is not None and hasattr(cluster, "topic_id") else None
            ids[topic] = str(found) if found is not None else None
        without = [tp for tp in self._parts if not partition_identity(ids[tp.topic], None).startswith("id:")]
        try:
            firsts = self._consumer.offsets_for_times(dict.fromkeys(without, 0)) if without else {}
        except KafkaError as exc:  # e.g. a broker without a time index: nothing to tell them by
            log_event(log, "cannot read the first records' timestamps", level=30, error=str(exc))
            firsts = {}
        out: dict[Partition, str] = {}
        for tp in self._parts:
            first = firsts.get(tp)
            out[(tp.topic, tp.partition)] = partition_identity(
                ids[tp.topic], (first.offset, first.timestamp) if first is not None else None
            )
        return out

    def _seek_stored(self, stored: Mapping[Partition, int], identities: Identities) -> None:
        ends = self._consumer.end_offsets(self._parts)
        resumed = 0
        for tp in self._parts:
            part = (tp.topic, tp.partition)
            kept = stored.get(part)
            recreated = was_recreated(identities.get(part), self._identities[part])
            offset = start_offset(kept, ends[tp], recreated=recreated)
            if kept is not None and recreated:
                log_event(
                    log,
                    "topic was recreated since the stored offset (its identity changed): reading it from the start",
                    level=30,
                    topic=tp.topic,
                    partition=tp.partition,
                    stored=kept,
                    stored_identity=identities.get(part),
                    identity=self._identities[part],
                )
                RECREATED.labels(tp.topic).inc()
            elif kept is not None and offset is None:
                log_event(
                    log,
                    "topic is behind the stored offset (recreated?): reading it from the start",
                    level=30,
                    topic=tp.topic,
                    partition=tp.partition,
                    stored=kept,
                    end=ends[tp],
                )
            self._identities[part] = carried_identity(identities.get(part), self._identities[part])
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
        """The next records (at most ``max_records``), in offset order within each partition. Every
        ``identity_check_s`` first looks for recreated topics (``check_identities``)."""
        if self.identity_check_s > 0 and time.monotonic() - self._checked_at >= self.identity_check_s:
            try:
                self.check_identities()
                self._check_failing = False
            except Exception as exc:  # noqa: BLE001 - the broker may be down: the next check retries
                self._checked_at = time.monotonic()
                if not self._check_failing:  # once per outage, not every few seconds
                    log_event(log, "could not check topic identities", level=30, error=str(exc))
                self._check_failing = True
        batches = self._consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
        return [_record(r) for records in batches.values() for r in records]

    def check_identities(self) -> list[Partition]:
        """Read the identities again; a partition whose topic was recreated is read again from its
        beginning (what was fetched of it and not yet handed out is dropped). Returns those partitions."""
        self._checked_at = time.monotonic()
        self._refresh_metadata()
        current = self._read_identities()
        changed = [
            p
            for p in self._parts
            if was_recreated(self._identities.get((p.topic, p.partition)), current[(p.topic, p.partition)])
        ]
        for tp in changed:
            part = (tp.topic, tp.partition)
            log_event(
                log,
                "topic was recreated while reading it: reading it again from the start",
                level=30,
                topic=tp.topic,
                partition=tp.partition,
                identity=self._identities[part],
                now=current[part],
            )
            RECREATED.labels(tp.topic).inc()
            self._consumer.seek_to_beginning(tp)
        self._identities = {
            part: carried_identity(self._identities.get(part), ident) for part, ident in current.items()
        }
        return [(tp.topic, tp.partition) for tp in changed]

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
        since_s: float | None = None,
    ):
        """``since_s`` (a Unix time), with ``start="beginning"``: each partition from its first
        record written at or after it (Kafka's time index), so that a reader that needs only recent
        records does not replay the whole topic."""
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
        try:
            since = (
                self._offsets_since(cfg, service, since_s, ends) if since_s is not None and start == "beginning" else {}
            )
        except Exception:
            self._consumer.close()
            raise
        assigned = []
        self.start_offsets: dict[Partition, int] = {}
        """Where each partition starts (0 for "the beginning", whatever its first offset is)."""
        for part in self._parts:
            if start == "end":
                offset = ends[part]
            elif start == "beginning":
                offset = since.get(part, confluent_kafka.OFFSET_BEGINNING)
            else:
                kept = start_offset(start.get(part), ends[part])
                offset = confluent_kafka.OFFSET_BEGINNING if kept is None else kept
            self.start_offsets[part] = max(offset, 0)
            assigned.append(confluent_kafka.TopicPartition(part[0], part[1], offset))
        self._consumer.assign(assigned)

    def _offsets_since(
        self, cfg: KafkaConfig, service: str, since_s: float, ends: dict[Partition, int]
    ) -> dict[Partition, int]:
        """Per partition, the offset of its first record at or after ``since_s`` (its end when none).

        Asked with kafka-python, whose answer carries the record's timestamp: some brokers (tansu)
        answer "no such record" with offset 0 rather than -1, which only the timestamp (-1) tells
        from "the first record"."""
        consumer = KafkaConsumer(**consumer_kwargs(cfg, service, group_id=None))
        try:
            asked = {TopicPartition(t, p): max(0, int(since_s * 1000)) for t, p in self._parts}
            found = consumer.offsets_for_times(asked, timeout_ms=int(self.metadata_timeout_s * 1000))
        finally:
            consumer.close()
        out: dict[Partition, int] = {}
        for tp, hit in found.items():
            part = (tp.topic, tp.partition)
            out[part] = (
                hit.offset if hit is not None and hit.timestamp is not None and hit.timestamp >= 0 else ends[part]
            )
        return out

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
