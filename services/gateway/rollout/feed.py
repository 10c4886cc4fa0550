"""Following rlhf.rollout: every RolloutEvent, in topic order, to the router and the /flywheel board.

    feed = RolloutFeed(kafka, router, board)
    feed.start()                        # a daemon thread: reads the topic from its beginning, then follows it
    feed.wait_caught_up(10.0)           # at start: the routing state before the first request (bounded)
    feed.stop()

The topic has one partition and every event carries the whole state, so the latest event read is
the routing. The thread reads from the beginning once (the board shows the recent history); when
reading fails (the broker is away) it starts a new reader after a pause, at the offset after the
last event it handled, so the routing never steps back to an older state. Until it has caught up,
every request goes to the stable group.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from services.gateway import metrics
from services.gateway.rollout.board import FlywheelBoard
from services.gateway.rollout.routing import Router
from shared.config import KafkaConfig
from shared.events import RolloutEvent
from shared.kafka.readers import AssignedReader, Partition, Record, decode_or_skip
from shared.kafka.topics import ROLLOUT
from shared.logging import get_logger, log_event

log = get_logger(__name__)

STAGES = frozenset({"candidate", "canary", "promoted", "rolled_back", "superseded", "paused", "resumed", "mode"})
"""Stages the metrics name; any other counts as "other" (a bounded label)."""


class Reader(Protocol):
    """What the feed reads with: an AssignedReader."""

    def poll(self) -> list[Record]: ...

    def lag(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class RolloutFeed:
    def __init__(
        self,
        kafka: KafkaConfig,
        router: Router,
        board: FlywheelBoard,
        *,
        retry_pause_s: float = 5.0,
        reader: Callable[[dict[Partition, int] | None], Reader] | None = None,
    ):
        self.kafka = kafka
        self.router = router
        self.board = board
        self.retry_pause_s = retry_pause_s
        self._make_reader = reader or self._assigned_reader
        self.next_offsets: dict[Partition, int] = {}
        """Per partition, the offset after the last event handled: where a new reader resumes."""
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _assigned_reader(self, resume: dict[Partition, int] | None) -> Reader:
        return AssignedReader(self.kafka, "gateway", [ROLLOUT], start=resume or "beginning")

    @property
    def following(self) -> bool:
        """Caught up with the topic and reading it."""
        return self.caught_up.is_set() and self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollout-feed", daemon=True)
        self._thread.start()

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Wait (bounded) until the topic has been read to its end; False when it has not."""
        return self.caught_up.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        metrics.ROLLOUT_FOLLOWING.set(0)

    def handle(self, ev: RolloutEvent) -> None:
        """One event, in topic order: the routing first, then the page."""
        changed = self.router.apply(ev)
        self.board.add(ev)
        metrics.ROLLOUT_EVENTS.labels(ev.stage if ev.stage in STAGES else "other").inc()
        metrics.ROLLOUT_SEQUENCE.set(ev.sequence)
        metrics.CANARY_SHARE.set(self.router.canary_share)
        if changed:
            log_event(
                log,
                "routing changed",
                sequence=ev.sequence,
                stage=ev.stage,
                stable=ev.stable,
                canary=ev.canary or "-",
                canary_share=self.router.canary_share,
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            reader = None
            try:
                reader = self._make_reader(dict(self.next_offsets) or None)
                self._follow(reader)
            except Exception as exc:  # noqa: BLE001 - the broker away, a bad state: retry, never end the feed
                metrics.ROLLOUT_FEED_ERRORS.inc()
                metrics.ROLLOUT_FOLLOWING.set(0)
                log_event(
                    log, "following rlhf.rollout failed; retrying", level=30, error=f"{type(exc).__name__}: {exc}"
                )
                self._stop.wait(self.retry_pause_s)
            finally:
                if reader is not None:
                    try:
                        reader.close()
                    except Exception:  # noqa: BLE001 - closing a broken reader: nothing left to do
                        pass

    def _follow(self, reader: Reader) -> None:
        while not self._stop.is_set():
            records = reader.poll()
            for record in records:
                env = decode_or_skip(record, expect=RolloutEvent)
                if env is not None:
                    self.handle(env.payload)
                self.next_offsets[(record.topic, record.partition)] = record.offset + 1
            if not records and not self.caught_up.is_set() and not any(reader.lag().values()):
                self.caught_up.set()
                log_event(log, "following rlhf.rollout", stable=self.router.state.stable or "-")
            if self.caught_up.is_set():
                metrics.ROLLOUT_FOLLOWING.set(1)
