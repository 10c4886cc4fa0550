"""Producing events with acks=all, without losing them while the process lives.

``EventPublisher.publish`` never blocks the caller (inference must keep serving when the broker is
down): it appends to an in-memory outbox that one background thread drains in order, retrying
each event with backoff until Kafka acknowledges it. Failures are counted and logged, never
silently dropped; only an outbox past its capacity drops its oldest event, with an error log and a
metric. ``publish_and_wait`` is for callers that must know the event is safely stored (feedback).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from shared.config import KafkaConfig
from shared.kafka import envelope
from shared.kafka.client import producer_kwargs
from shared.kafka.metrics import EVENTS_DROPPED, EVENTS_PUBLISHED, OUTBOX_SIZE, PUBLISH_FAILURES
from shared.logging import get_logger, log_event

log = get_logger(__name__)


@dataclass
class _Pending:
    topic: str
    key: bytes | None
    value: bytes
    attempts: int = 0


class EventPublisher:
    """Publishes envelopes to Kafka from a background thread, retrying until acknowledged."""

    def __init__(self, cfg: KafkaConfig, service: str, *, capacity: int = 100_000,
                 max_backoff_s: float = 5.0):
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
                log_event(log, "outbox full: dropped oldest event", level=40, topic=dropped.topic,
                          capacity=self.capacity)
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
                log_event(log, "publish failed; will retry", level=30, topic=item.topic,
                          attempts=item.attempts, error=f"{type(exc).__name__}: {exc}")
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
            self._producer.send(topic, key=key.encode() if key else None,
                                value=envelope.encode(env)).get(timeout=self.cfg.delivery_timeout_s + 5)
        except KafkaError:
            PUBLISH_FAILURES.labels(topic).inc()
            raise
        EVENTS_PUBLISHED.labels(topic).inc()
        return env

    def close(self) -> None:
        self._producer.close(timeout=5)


class AsyncPublisher:
    """Publishes from asyncio code and awaits Kafka's acks=all acknowledgement.

    ``publish`` appends to kafka-python's producer (which batches concurrent records into one
    request) and resolves when the broker acknowledges; it raises when the record cannot be
    delivered within the delivery timeout. No thread is held per call: once a producer knows a
    topic's partitions, ``send`` does not block and runs on the loop; only a new producer's first
    send per topic (which may wait for metadata) runs in a thread.
    """

    def __init__(self, cfg: KafkaConfig, service: str):
        self.cfg = cfg
        self.service = service
        self._producer: KafkaProducer | None = None
        self._ready_topics: set[str] = set()
        self._lock = threading.Lock()

    def _get_producer(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                self._producer = KafkaProducer(**producer_kwargs(self.cfg, self.service))
                self._ready_topics = set()
            return self._producer

    def _send_blocking(self, topic: str, key: bytes | None, value: bytes):
        producer = self._get_producer()
        future = producer.send(topic, key=key, value=value)
        with self._lock:
            if self._producer is producer:
                self._ready_topics.add(topic)
        return producer, future

    async def publish(self, topic: str, payload: Any, key: str | None = None) -> envelope.Envelope:
        import asyncio

        env = envelope.wrap(payload, self.service)
        value = envelope.encode(env)
        raw_key = key.encode() if key else None
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def settle(result: Any = None, error: BaseException | None = None) -> None:
            if not done.done():
                done.set_exception(error) if error else done.set_result(result)

        producer = self._producer
        try:
            if producer is not None and topic in self._ready_topics:
                future = producer.send(topic, key=raw_key, value=value)
            else:
                producer, future = await asyncio.to_thread(self._send_blocking, topic, raw_key, value)
        except Exception:
            PUBLISH_FAILURES.labels(topic).inc()
            self._reset(producer)
            raise
        future.add_callback(lambda md: loop.call_soon_threadsafe(settle, md))
        future.add_errback(lambda exc: loop.call_soon_threadsafe(settle, None, exc))
        try:
            await asyncio.wait_for(done, self.cfg.delivery_timeout_s + 5)
        except Exception:
            PUBLISH_FAILURES.labels(topic).inc()
            self._reset(producer)
            raise
        EVENTS_PUBLISHED.labels(topic).inc()
        return env

    def _reset(self, failed: KafkaProducer | None) -> None:
        """Discard the producer that failed, unless another call has replaced it already."""
        with self._lock:
            if failed is not None and self._producer is failed:
                discard_producer(self._producer)
                self._producer = None
                self._ready_topics = set()

    def close(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except Exception as exc:  # noqa: BLE001
                log_event(log, "producer close failed", level=30, error=str(exc))
