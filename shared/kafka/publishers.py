"""Publishing events with acks=all: one interface, two clients, and an outbox.

    publisher = KafkaPublisher(kafka, "trainer")               # kafka-python: the project's client
    publisher.publish_and_wait(POLICY_UPDATES, event, key="policy")    # blocks until acknowledged
    envelope = await publisher.publish(FEEDBACK, rating, key=user)     # the same, from asyncio code
    outbox = Outbox(KafkaPublisher(kafka, "inference"), spill_dir=state / "outbox")  # never blocks; survives kill -9
    outbox.publish(COMPLETIONS, completion, key=request_id)

Every ``Publisher`` wraps a payload in a versioned envelope and reports Kafka's acks=all
acknowledgement (or raises ``PublishFailed``): ``publish_and_wait`` for threads, ``publish`` and
``publish_many`` for asyncio code. Two implementations:

- ``KafkaPublisher`` on kafka-python, the project's Kafka client, used by every service;
- ``RdKafkaPublisher`` on confluent-kafka (librdkafka), only where a measurement showed it is needed:
  the feedback service's thousands of acknowledged ratings a second (its C producer costs a
  fraction of kafka-python's CPU per record; see docs/benchmarks.md).

``Outbox`` is for callers that must never block or fail (inference keeps serving while the broker is
down): ``publish`` appends to a queue that one background thread drains in order through a
Publisher, retrying each record with backoff until it is acknowledged. The queue is in memory
(bounded in events and bytes) or, with ``spill_dir``, a journal on disk that survives ``kill -9``
and is replayed by the next Outbox on the same directory (spill.py). Failures are counted and
logged, never silently dropped: an outbox past its bound drops its oldest records, and a record that
keeps failing while later ones are accepted is moved aside, each with an error log and a metric.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import confluent_kafka
from kafka import KafkaProducer

from shared.config import KafkaConfig
from shared.kafka import envelope
from shared.kafka.client import LINGER_MS, producer_kwargs, rdkafka_producer_config
from shared.kafka.metrics import (
    EVENTS_DROPPED,
    EVENTS_PUBLISHED,
    OUTBOX_BYTES,
    OUTBOX_MOVED_ASIDE,
    OUTBOX_SIZE,
    PUBLISH_FAILURES,
)
from shared.kafka.spill import MemoryQueue, Pending, SpillJournal
from shared.logging import get_logger, log_event

log = get_logger(__name__)
# librdkafka's own log lines (connection failures and the like), served through poll().
_RDKAFKA_LOG = get_logger("rdkafka")

Record = tuple[str, Any, str | None]
"""(topic, payload, key) of one record to publish."""


class PublishFailed(RuntimeError):
    """Kafka did not acknowledge a record (the broker refused it, or the delivery timeout passed)."""


class Publisher(Protocol):
    """Publishes envelopes and reports Kafka's acks=all acknowledgement."""

    service: str

    def send_and_wait(self, topic: str, value: bytes, key: bytes | None) -> None:
        """Deliver one encoded record; raises PublishFailed when Kafka did not acknowledge it."""

    def publish_and_wait(self, topic: str, payload: Any, key: str | None = None) -> envelope.Envelope:
        """Wrap ``payload`` (a registered event) and deliver it; its envelope once acknowledged."""

    async def publish(self, topic: str, payload: Any, key: str | None = None) -> envelope.Envelope:
        """``publish_and_wait`` for asyncio code: the loop is never blocked."""

    async def publish_many(self, records: Sequence[Record]) -> list[envelope.Envelope | PublishFailed]:
        """Several records at once; each outcome is its envelope or the PublishFailed it failed with."""

    def send_many_and_wait(self, records: Sequence[tuple[str, bytes, bytes | None]]) -> list[str | None]:
        """Deliver encoded records in order, several in flight at once; each outcome is None when
        acknowledged, else why it failed."""

    def reachable(self, topic: str) -> bool:
        """Whether a broker answers now with ``topic``'s metadata (blocks a few seconds at most)."""

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what can be delivered in ``timeout_s``, then release the connection."""


class _Envelopes:
    """What every Publisher does the same way: wrap, encode, count."""

    service: str

    def send_and_wait(self, topic: str, value: bytes, key: bytes | None) -> None:
        raise NotImplementedError

    async def publish_many(self, records: Sequence[Record]) -> list[envelope.Envelope | PublishFailed]:
        raise NotImplementedError

    def send_many_and_wait(self, records: Sequence[tuple[str, bytes, bytes | None]]) -> list[str | None]:
        out: list[str | None] = []
        for topic, value, key in records:
            try:
                self.send_and_wait(topic, value, key)
                out.append(None)
            except PublishFailed as exc:
                out.append(str(exc))
        return out

    def publish_and_wait(self, topic: str, payload: Any, key: str | None = None) -> envelope.Envelope:
        env = envelope.wrap(payload, self.service)
        self.send_and_wait(topic, envelope.encode(env), key.encode() if key else None)
        return env

    async def publish(self, topic: str, payload: Any, key: str | None = None) -> envelope.Envelope:
        result = (await self.publish_many([(topic, payload, key)]))[0]
        if isinstance(result, PublishFailed):
            raise result
        return result


# --- kafka-python ---------------------------------------------------------------------------------


class KafkaPublisher(_Envelopes):
    """A Publisher on kafka-python. A producer whose delivery failed is replaced by a fresh one for
    the next record (a kafka-python producer can enter a fatal state it never leaves)."""

    def __init__(self, cfg: KafkaConfig, service: str):
        self.cfg = cfg
        self.service = service
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()

    def connect(self) -> KafkaPublisher:
        """Build the producer now (raises when no broker answers) instead of at the first record."""
        self._current()
        return self

    def _current(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                self._producer = KafkaProducer(**producer_kwargs(self.cfg, self.service))
            return self._producer

    def send_and_wait(self, topic: str, value: bytes, key: bytes | None) -> None:
        producer = None
        try:
            producer = self._current()
            # The producer fails the future itself at delivery_timeout; the margin only guards a hang.
            producer.send(topic, key=key, value=value).get(timeout=self.cfg.delivery_timeout_s + 5)
        except Exception as exc:
            PUBLISH_FAILURES.labels(topic).inc()
            self._discard(producer)
            raise PublishFailed(f"{topic}: {type(exc).__name__}: {exc}") from exc
        EVENTS_PUBLISHED.labels(topic).inc()

    def send_many_and_wait(self, records: Sequence[tuple[str, bytes, bytes | None]]) -> list[str | None]:
        # All handed to the producer first, then waited for: one round trip for the lot instead of
        # one per record (the idempotent producer keeps them in order).
        producer = None
        try:
            producer = self._current()
        except Exception as exc:  # noqa: BLE001 - no producer (no broker): every record failed
            for topic, _, _ in records:
                PUBLISH_FAILURES.labels(topic).inc()
            return [f"{type(exc).__name__}: {exc}"] * len(records)
        futures: list[Any] = []
        for topic, value, key in records:
            try:
                futures.append(producer.send(topic, key=key, value=value))
            except Exception as exc:  # noqa: BLE001 - refused before sending (too large, ...)
                futures.append(exc)
        out: list[str | None] = []
        for (topic, _, _), future in zip(records, futures, strict=True):
            error = None
            if isinstance(future, Exception):
                error = f"{topic}: {type(future).__name__}: {future}"
            else:
                try:
                    future.get(timeout=self.cfg.delivery_timeout_s + 5)
                except Exception as exc:  # noqa: BLE001 - any delivery failure is reported per record
                    error = f"{topic}: {type(exc).__name__}: {exc}"
            if error is None:
                EVENTS_PUBLISHED.labels(topic).inc()
            else:
                PUBLISH_FAILURES.labels(topic).inc()
            out.append(error)
        if any(out):
            self._discard(producer)
        return out

    def reachable(self, topic: str) -> bool:
        # After a failed delivery the producer was replaced: this one fetches fresh metadata.
        try:
            return bool(self._current().partitions_for(topic))
        except Exception:  # noqa: BLE001 - any failure means: not reachable now
            return False

    async def publish_many(self, records: Sequence[Record]) -> list[envelope.Envelope | PublishFailed]:
        def deliver() -> list[envelope.Envelope | PublishFailed]:
            out: list[envelope.Envelope | PublishFailed] = []
            for topic, payload, key in records:
                try:
                    out.append(self.publish_and_wait(topic, payload, key))
                except PublishFailed as exc:
                    out.append(exc)
            return out

        return await asyncio.to_thread(deliver)

    def _discard(self, producer: KafkaProducer | None) -> None:
        """Drop a producer after a failed delivery; the next record builds a fresh one. Safe against
        duplicates: the failed future means this producer no longer holds the record."""
        if producer is None:
            return
        with self._lock:
            if self._producer is producer:
                self._producer = None

        def close(discarded: KafkaProducer) -> None:
            try:
                discarded.close(timeout=0)
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

        threading.Thread(target=close, args=(producer,), name="discard-producer", daemon=True).start()

    def close(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - unsent records are reported by their callers
                log_event(log, "producer close failed", level=30, error=str(exc))


# --- confluent-kafka (librdkafka) -------------------------------------------------------------------


class _RdProducer:
    """One librdkafka producer and the thread that serves its delivery reports.

    librdkafka does the network I/O, batching and retries in its own C threads; Python only has to
    call ``poll`` for the delivery reports, which this thread does, so that no event loop blocks.
    """

    def __init__(self, cfg: KafkaConfig, service: str, linger_ms: float):
        self.fatal = False
        self._service = service
        self._brokers_down_logged = False
        conf = rdkafka_producer_config(cfg, service, linger_ms=linger_ms)
        conf["error_cb"] = self._on_error
        conf["logger"] = _RDKAFKA_LOG
        self.producer = confluent_kafka.Producer(conf)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"rdkafka-deliveries-{service}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.1)

    def _on_error(self, err: confluent_kafka.KafkaError) -> None:
        if err.fatal():
            # An idempotent producer that went fatal never recovers: its records fail, the
            # publisher replaces it.
            self.fatal = True
            log_event(log, "Kafka producer failed fatally; it will be replaced", level=40, error=err.str())
        elif err.code() == confluent_kafka.KafkaError._ALL_BROKERS_DOWN:
            if not self._brokers_down_logged:
                self._brokers_down_logged = True
                log_event(
                    log, "no Kafka broker reachable; records wait until the delivery timeout", level=30, error=err.str()
                )
        else:
            log_event(log, "Kafka producer error (librdkafka retries it)", level=20, error=err.str())

    def close(self, timeout_s: float) -> int:
        """Deliver what can be delivered in ``timeout_s``; returns how many records are left."""
        self._stop.set()
        self._thread.join(timeout=1)
        left = self.producer.flush(timeout_s)  # flush serves the remaining delivery reports itself
        if left:
            log_event(log, "closing Kafka producer with unacknowledged records", level=40, count=left)
        return left


class _LoopDeliveries:
    """Hands delivery reports from the librdkafka thread to one event loop, one wake-up per batch
    of reports instead of one per record, and fails records whose report never came by ``deadline_s``
    (librdkafka reports every record by its delivery timeout; this only guards against a hang)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline_s: float):
        self.loop = loop
        self.deadline_s = deadline_s
        self._ready: list[tuple[asyncio.Future, Any]] = []
        self._lock = threading.Lock()
        # (deadline, future) in deadline order, since every record gets the same allowance.
        self._pending: collections.deque[tuple[float, asyncio.Future]] = collections.deque()
        self._sweeping = False

    def expect(self) -> asyncio.Future:
        """A future for one record's delivery report: None when acknowledged, else the error."""
        done = self.loop.create_future()
        self._pending.append((self.loop.time() + self.deadline_s, done))
        if not self._sweeping:
            self._sweeping = True
            self.loop.call_later(1.0, self._sweep)
        return done

    def reporter(self, done: asyncio.Future) -> Callable[[Any, Any], None]:
        """The ``on_delivery`` callback of the record ``done`` waits for."""
        return lambda err, _msg: self.put(done, err)

    def put(self, done: asyncio.Future, err: Any) -> None:
        with self._lock:
            self._ready.append((done, err))
            first = len(self._ready) == 1
        if first:
            try:
                self.loop.call_soon_threadsafe(self._settle)
            except RuntimeError:  # the loop is closed; nobody waits any more
                pass

    def _settle(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for done, err in ready:
            if not done.done():
                done.set_result(err)

    def _sweep(self) -> None:
        now = self.loop.time()
        while self._pending and (self._pending[0][1].done() or self._pending[0][0] <= now):
            _, done = self._pending.popleft()
            if not done.done():
                done.set_result("no delivery report within the delivery timeout")
        self._sweeping = bool(self._pending)
        if self._sweeping:
            self.loop.call_later(1.0, self._sweep)


class RdKafkaPublisher(_Envelopes):
    """A Publisher on librdkafka (confluent-kafka), for the feedback service's hot path.

    ``publish_many`` hands the records to librdkafka, which batches concurrent records into few
    produce requests, and resolves when the broker has acknowledged them with acks=all; the call
    never blocks the loop. A producer whose delivery failed is replaced by a fresh one for later
    records (records it still holds are delivered or failed in the background).
    """

    def __init__(self, cfg: KafkaConfig, service: str, *, linger_ms: float = LINGER_MS):
        self.cfg = cfg
        self.service = service
        self.linger_ms = linger_ms
        """How long librdkafka holds a record for others to share its produce request."""
        self._producer: _RdProducer | None = None
        self._deliveries: dict[asyncio.AbstractEventLoop, _LoopDeliveries] = {}
        self._lock = threading.Lock()

    def _current(self) -> _RdProducer:
        with self._lock:
            if self._producer is None or self._producer.fatal:
                if self._producer is not None:
                    self._discard_locked()
                self._producer = _RdProducer(self.cfg, self.service, self.linger_ms)
            return self._producer

    def warm_up(self, timeout_s: float = 10.0) -> bool:
        """Connect and fetch the cluster's metadata now (blocking), so that the first publish does
        not wait for it (about 0.3 s with idempotence); False when no broker answered in time."""
        try:
            self._current().producer.list_topics(timeout=timeout_s)
            return True
        except confluent_kafka.KafkaException as exc:
            log_event(log, "Kafka producer warm-up failed; the first publish will connect", level=30, error=str(exc))
            return False

    def reachable(self, topic: str) -> bool:
        try:
            meta = self._current().producer.list_topics(topic, timeout=5)
        except confluent_kafka.KafkaException:
            return False
        found = meta.topics.get(topic)
        return found is not None and found.error is None and bool(found.partitions)

    def send_and_wait(self, topic: str, value: bytes, key: bytes | None) -> None:
        current = self._current()
        done = threading.Event()
        outcome: list[Any] = []

        def report(err: Any, _msg: Any) -> None:
            outcome.append(err)
            done.set()

        try:
            current.producer.produce(topic, value, key, on_delivery=report)
        except (BufferError, confluent_kafka.KafkaException) as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")
            done.set()
        if not done.wait(self.cfg.delivery_timeout_s + 5):
            outcome.append("no delivery report within the delivery timeout")
        if outcome[0] is not None:
            PUBLISH_FAILURES.labels(topic).inc()
            self._reset(current)
            raise PublishFailed(f"{topic}: {outcome[0]}")
        EVENTS_PUBLISHED.labels(topic).inc()

    async def publish_many(self, records: Sequence[Record]) -> list[envelope.Envelope | PublishFailed]:
        loop = asyncio.get_running_loop()
        deliveries = self._deliveries.get(loop)
        if deliveries is None:
            deliveries = self._deliveries.setdefault(loop, _LoopDeliveries(loop, self.cfg.delivery_timeout_s + 5))
        current = self._current()
        produce = current.producer.produce
        envs: list[envelope.Envelope] = []
        waits: list[asyncio.Future] = []
        refused = None
        for topic, payload, key in records:
            env = envelope.wrap(payload, self.service)
            done = deliveries.expect()
            envs.append(env)
            waits.append(done)
            if refused is None:
                try:
                    produce(
                        topic,
                        envelope.encode(env),
                        key.encode() if key else None,
                        on_delivery=deliveries.reporter(done),
                    )
                    continue
                except (BufferError, confluent_kafka.KafkaException) as exc:
                    refused = f"{type(exc).__name__}: {exc}"  # and the records after it are not handed over
            done.set_result(refused)
        errors = await asyncio.gather(*waits)
        out: list[envelope.Envelope | PublishFailed] = []
        for (topic, _, _), env, err in zip(records, envs, errors, strict=True):
            if err is None:
                EVENTS_PUBLISHED.labels(topic).inc()
                out.append(env)
            else:
                PUBLISH_FAILURES.labels(topic).inc()
                out.append(PublishFailed(f"{topic}: {err}"))
        if any(err is not None for err in errors):
            self._reset(current)
        return out

    def _reset(self, failed: _RdProducer) -> None:
        """Replace the producer that failed, unless another call has replaced it already."""
        with self._lock:
            if self._producer is failed:
                self._discard_locked()

    def _discard_locked(self) -> None:
        old, self._producer = self._producer, None
        if old is not None:
            threading.Thread(
                target=old.close, args=(self.cfg.delivery_timeout_s + 1,), name="discard-producer", daemon=True
            ).start()

    def close(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            old, self._producer = self._producer, None
        if old is not None:
            old.close(timeout_s)


# --- the outbox -------------------------------------------------------------------------------------

DEFAULT_MAX_ATTEMPTS = 20
"""Failed sends of one record in a row before it is a suspect (moved aside if the broker answers)."""


class Outbox:
    """Publishes through ``publisher`` from a background thread, retrying until acknowledged;
    ``publish`` never blocks the caller (beyond one write to the spill journal).

    Without ``spill_dir`` the records wait in memory: at most ``capacity`` events and
    ``capacity_bytes`` bytes, the oldest dropped past either (error log, ``rlhf_kafka_events_dropped_total``),
    and lost with the process. With ``spill_dir`` they wait in a journal there (spill.SpillJournal):
    ``kill -9`` loses nothing accepted, a new Outbox on the same directory sends what is left, and
    the bound is ``spill_max_bytes`` on disk (memory holds one record).

    A record that failed ``max_attempts`` times in a row is a suspect: when the broker answers
    (``Publisher.reachable``: fresh metadata for the topic) and the record fails once more, it is
    moved aside (to ``aside.seg`` in the spill directory; dropped without one), counted
    (``rlhf_kafka_outbox_moved_aside_total``) and logged, and the records behind it flow again.
    While the broker does not answer the outbox keeps waiting with every record in place, in order.
    """

    def __init__(
        self,
        publisher: Publisher,
        *,
        capacity: int = 100_000,
        capacity_bytes: int = 64 << 20,
        max_backoff_s: float = 5.0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        spill_dir: Path | None = None,
        spill_max_bytes: int = 1 << 30,
        spill_segment_bytes: int = 8 << 20,
        window: int = 64,
    ):
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.publisher = publisher
        self.service = publisher.service
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes
        self.max_backoff_s = max_backoff_s
        self.max_attempts = max_attempts
        self.window = max(1, window)
        """Records sent at once from the head of the queue (acknowledged as one round trip). When one
        fails, those after it that Kafka took are sent again with the rest: at least once."""
        self._queue: MemoryQueue | SpillJournal
        if spill_dir is None:
            self._queue = MemoryQueue(max_events=capacity, max_bytes=capacity_bytes)
        else:
            self._queue = SpillJournal(spill_dir, segment_bytes=spill_segment_bytes, max_bytes=spill_max_bytes)
        self._cond = threading.Condition()
        self._closed = False
        self._released = False
        """The queue's files are closed (after ``close``): a send finishing late changes nothing."""
        self._show()
        self._thread = threading.Thread(target=self._run, name=f"outbox-{self.service}", daemon=True)
        self._thread.start()

    @property
    def replayed(self) -> int:
        """Records found in the spill journal at start (left by a previous process)."""
        return getattr(self._queue, "replayed", 0)

    def publish(self, topic: str, payload: Any, key: str | None = None) -> str:
        """Queue ``payload`` (a registered event dataclass) for ``topic``; returns its event id."""
        env = envelope.wrap(payload, self.service)
        item = Pending(topic, key.encode() if key else None, envelope.encode(env))
        with self._cond:
            if self._closed:
                raise RuntimeError("the outbox is closed")
            try:
                dropped = self._queue.append(item)
            except OSError as exc:  # the spill journal cannot be written (disk full): never the caller's failure
                dropped = [item]
                log_event(log, "outbox spill journal not writable: event dropped", level=40, error=str(exc))
            self._show()
            self._cond.notify()
        for gone in dropped:
            EVENTS_DROPPED.labels(gone.topic).inc()
        if dropped:
            log_event(
                log,
                "outbox full: dropped the oldest events",
                level=40,
                topic=dropped[0].topic,
                count=len(dropped),
                capacity=self.capacity,
                capacity_bytes=self.capacity_bytes,
                spill=str(getattr(self._queue, "directory", "")) or None,
            )
        return env.event_id

    @property
    def pending(self) -> int:
        with self._cond:
            return self._queue.events

    @property
    def pending_bytes(self) -> int:
        with self._cond:
            return self._queue.bytes

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued event is acknowledged (or moved aside); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue.events:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush what can be flushed in ``timeout_s``, then stop; reports what is left unsent (kept
        in the spill journal for the next start, when there is one)."""
        flushed = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            left = self._queue.events
            self._cond.notify_all()
        self._thread.join(timeout=5)  # a send still waiting on the broker then changes nothing (_released)
        if not flushed:
            kept = isinstance(self._queue, SpillJournal)
            log_event(log, "closing with unacknowledged events", level=30 if kept else 40, count=left, kept=kept)
        with self._cond:
            self._released = True
            self._queue.close()
        self.publisher.close(2)

    def _show(self) -> None:
        OUTBOX_SIZE.set(self._queue.events)
        OUTBOX_BYTES.set(self._queue.bytes)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (item := self._queue.head()) is None:
                    self._cond.wait()
                if self._closed or item is None:
                    return
                # A head that failed before goes alone until it is through: the records behind
                # it are not sent again and again.
                batch = self._queue.peek(self.window if item.attempts == 0 else 1)
            assert batch and batch[0] is item
            sent = self._send_batch(batch)
            if sent:
                self._done(batch[sent - 1])  # the acknowledged prefix; a failed record heads the queue now
                continue
            if item.attempts >= self.max_attempts and self.publisher.reachable(item.topic):
                # The broker answers, yet this record failed again and again: one more try now,
                # then it is moved aside (never reordered: the records behind it wait until then).
                if not self._send(item):
                    self._move_aside(item)
                self._done(item)
                continue
            backoff = min(self.max_backoff_s, 0.1 * 2 ** min(item.attempts, 6))
            with self._cond:
                self._cond.wait_for(lambda: self._closed, timeout=backoff)

    def _done(self, item: Pending) -> None:
        with self._cond:
            if self._released:
                return
            self._queue.remove_through(item)
            self._show()
            self._cond.notify_all()

    def _move_aside(self, suspect: Pending) -> None:
        with self._cond:
            kept = not self._released and self._queue.put_aside(suspect)
        OUTBOX_MOVED_ASIDE.labels(suspect.topic).inc()
        log_event(
            log,
            "an event kept failing while the broker answered: moved aside",
            level=40,
            topic=suspect.topic,
            attempts=suspect.attempts,
            bytes=len(suspect.value),
            kept_in=str(getattr(self._queue, "directory", "")) + "/aside.seg" if kept else None,
        )

    def _send_batch(self, batch: list[Pending]) -> int:
        """Send ``batch`` (the head of the queue first) at once; returns how many records from the
        start were acknowledged (a record after a failed one is sent again later: at least once)."""
        if len(batch) == 1:
            return 1 if self._send(batch[0]) else 0
        head = batch[0]
        head.attempts += 1
        errors = self.publisher.send_many_and_wait([(p.topic, p.value, p.key) for p in batch])
        sent = next((i for i, error in enumerate(errors) if error is not None), len(batch))
        if 0 < sent < len(batch):
            batch[sent].attempts += 1  # it heads the queue next, alone (see _run)
        if sent == 0 and (head.attempts == 1 or head.attempts % 20 == 0):
            log_event(
                log, "publish failed; will retry", level=30, topic=head.topic, attempts=head.attempts, error=errors[0]
            )
        elif sent and head.attempts > 1:
            log_event(log, "published after retries", topic=head.topic, attempts=head.attempts)
        return sent

    def _send(self, item: Pending) -> bool:
        item.attempts += 1
        try:
            self.publisher.send_and_wait(item.topic, item.value, item.key)
        except PublishFailed as exc:
            if item.attempts == 1 or item.attempts % 20 == 0:
                log_event(
                    log,
                    "publish failed; will retry",
                    level=30,
                    topic=item.topic,
                    attempts=item.attempts,
                    error=str(exc),
                )
            return False
        if item.attempts > 1:
            log_event(log, "published after retries", topic=item.topic, attempts=item.attempts)
        return True
