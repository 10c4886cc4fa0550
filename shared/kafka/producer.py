"""Producing events with acks=all, without losing them while the process lives.

``EventPublisher.publish`` never blocks the caller (inference must keep serving when the broker is
down): it appends to an in-memory outbox that one background thread drains in order, retrying
each event with backoff until Kafka acknowledges it. Failures are counted and logged, never
silently dropped; only an outbox past its capacity drops its oldest event, with an error log and a
metric. ``SyncPublisher.publish_and_wait`` and ``AsyncPublisher.publish`` are for callers that must
know the event is safely stored (feedback); ``AsyncPublisher`` runs on librdkafka (confluent-kafka),
whose C producer costs a fraction of kafka-python's CPU per record, for the feedback service's
thousands of acknowledged ratings a second.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from typing import Any

import confluent_kafka
from kafka import KafkaProducer
from kafka.errors import KafkaError

from shared.config import KafkaConfig
from shared.kafka import envelope
from shared.kafka.client import LINGER_MS, producer_kwargs, rdkafka_producer_config
from shared.kafka.metrics import EVENTS_DROPPED, EVENTS_PUBLISHED, OUTBOX_SIZE, PUBLISH_FAILURES
from shared.logging import get_logger, log_event

log = get_logger(__name__)
# librdkafka's own log lines (connection failures and the like), served through poll().
_RDKAFKA_LOG = get_logger("rdkafka")


@dataclass
class _Pending:
    topic: str
    key: bytes | None
    value: bytes
    attempts: int = 0


class EventPublisher:
    """Publishes envelopes to Kafka from a background thread, retrying until acknowledged."""

    def __init__(self, cfg: KafkaConfig, service: str, *, capacity: int = 100_000, max_backoff_s: float = 5.0):
        self.cfg = cfg
        self.service = service
        self.capacity = capacity
        self.max_backoff_s = max_backoff_s
        self._outbox: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._producer: KafkaProducer | None = None
        self._thread = threading.Thread(target=self._run, name=f"publisher-{service}", daemon=True)
        self._thread.start()

    # --- API -------------------------------------------------------------------------------

    def publish(self, topic: str, payload: Any, key: str | None = None) -> str:
        """Queue ``payload`` (a registered event dataclass) for ``topic``; returns its event id."""
        env = envelope.wrap(payload, self.service)
        item = _Pending(topic, key.encode() if key else None, envelope.encode(env))
        with self._cond:
            if self._closed:
                raise RuntimeError("publisher is closed")
            if len(self._outbox) >= self.capacity:
                dropped = self._outbox.popleft()
                EVENTS_DROPPED.labels(dropped.topic).inc()
                log_event(
                    log, "outbox full: dropped oldest event", level=40, topic=dropped.topic, capacity=self.capacity
                )
            self._outbox.append(item)
            OUTBOX_SIZE.set(len(self._outbox))
            self._cond.notify()
        return env.event_id

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._outbox)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued event is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._outbox:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush what can be flushed in ``timeout_s``, then stop; reports what is left unsent."""
        flushed = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            left = len(self._outbox)
            self._cond.notify_all()
        self._thread.join(timeout=5)
        if not flushed:
            log_event(log, "closing with unacknowledged events", level=40, count=left)
        if self._producer is not None:
            try:
                self._producer.close(timeout=2)
            except Exception as exc:  # noqa: BLE001 - unsent records are already reported above
                log_event(log, "producer close failed", level=30, error=str(exc))

    # --- background thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._outbox and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                item = self._outbox[0]
            if self._send(item):
                with self._cond:
                    # Only this thread removes from the left, except publish() on overflow.
                    if self._outbox and self._outbox[0] is item:
                        self._outbox.popleft()
                    OUTBOX_SIZE.set(len(self._outbox))
                    self._cond.notify_all()
            else:
                backoff = min(self.max_backoff_s, 0.1 * 2 ** min(item.attempts, 6))
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, timeout=backoff)

    def _send(self, item: _Pending) -> bool:
        item.attempts += 1
        try:
            if self._producer is None:
                self._producer = KafkaProducer(**producer_kwargs(self.cfg, self.service))
            future = self._producer.send(item.topic, key=item.key, value=item.value)
            # The producer fails the future itself at delivery_timeout; the margin only guards a hang.
            future.get(timeout=self.cfg.delivery_timeout_s + 5)
        except Exception as exc:  # noqa: BLE001 - this thread must outlive any client error
            PUBLISH_FAILURES.labels(item.topic).inc()
            if item.attempts == 1 or item.attempts % 20 == 0:
                log_event(
                    log,
                    "publish failed; will retry",
                    level=30,
                    topic=item.topic,
                    attempts=item.attempts,
                    error=f"{type(exc).__name__}: {exc}",
                )
            discard_producer(self._producer)
            self._producer = None
            return False
        EVENTS_PUBLISHED.labels(item.topic).inc()
        if item.attempts > 1:
            log_event(log, "published after retries", topic=item.topic, attempts=item.attempts)
        return True


def discard_producer(producer: KafkaProducer | None) -> None:
    """Drop a producer after a failed delivery and let the next attempt build a fresh one.

    A kafka-python producer can enter a fatal state it never leaves (seen when a restarted broker
    answered InitProducerId with an error). Safe against duplicates: the failed future means this
    producer no longer holds the record.
    """
    if producer is None:
        return

    def close() -> None:
        try:
            producer.close(timeout=0)
        except Exception:  # noqa: BLE001 - it is being thrown away
            pass

    threading.Thread(target=close, name="discard-producer", daemon=True).start()


class SyncPublisher:
    """Publishes one event and waits for Kafka's acks=all acknowledgement (or raises)."""

    def __init__(self, cfg: KafkaConfig, service: str):
        self.cfg = cfg
        self.service = service
        self._producer = KafkaProducer(**producer_kwargs(cfg, service))

    def publish_and_wait(self, topic: str, payload: Any, key: str | None = None) -> envelope.Envelope:
        env = envelope.wrap(payload, self.service)
        try:
            self._producer.send(topic, key=key.encode() if key else None, value=envelope.encode(env)).get(
                timeout=self.cfg.delivery_timeout_s + 5
            )
        except KafkaError:
            PUBLISH_FAILURES.labels(topic).inc()
            raise
        EVENTS_PUBLISHED.labels(topic).inc()
        return env

    def close(self) -> None:
        self._producer.close(timeout=5)


class PublishFailed(RuntimeError):
    """Kafka did not acknowledge a record (the broker refused it, or the delivery timeout passed)."""


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


class AsyncPublisher:
    """Publishes from asyncio code and awaits Kafka's acks=all acknowledgement.

    ``publish`` hands the record to librdkafka (confluent-kafka), which batches concurrent records
    into few produce requests, and resolves when the broker has acknowledged it with acks=all; it
    raises ``PublishFailed`` when the record cannot be delivered within the delivery timeout. The
    call never blocks the loop. A producer whose delivery failed is replaced by a fresh one for
    later records (records it still holds are delivered or failed in the background).
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

    async def publish(self, topic: str, payload: Any, key: str | None = None) -> envelope.Envelope:
        result = (await self.publish_many([(topic, payload, key)]))[0]
        if isinstance(result, PublishFailed):
            raise result
        return result

    async def publish_many(self, records: list[tuple[str, Any, str | None]]) -> list[envelope.Envelope | PublishFailed]:
        """``publish`` for several (topic, payload, key) records handed to librdkafka at once and
        awaited together, without a task per record; each outcome is the record's envelope once
        Kafka acknowledged it, or the PublishFailed it failed with."""
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
                        on_delivery=lambda err, _msg, done=done: deliveries.put(done, err),
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
