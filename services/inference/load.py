"""The load a replica carries, by request source: what the trainer reads (GetLoad) to yield to users.

    load = LoadTracker()
    ticket = load.enter("user", arrived_at)     # where a request is admitted
    ticket.first_token(now)                     # when its first token comes
    ticket.leave()                              # when it finishes, however it ends
    load.snapshot()                             # -> LoadSnapshot (in flight, waiting, recent TTFT, quiet)

"Waiting" in a snapshot is the user requests that have waited at least ``waiting_after_s`` for their
first token: queued behind other work, not merely just sent (a closed loop of 4 users has all 4
"waiting" for a few milliseconds at a time, which is not a reason for the trainer to stop).

Every update is O(1) (counters, a map of the user requests still before their first token, and a
bounded ring of recent user TTFTs); a snapshot sorts at most ``ttft_kept`` numbers and looks at the
user requests in flight. Everything runs on the serving event loop: no locks.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.inference import metrics

SOURCES = ("user", "trainer")
"""The sources counted (InferenceServing.validate admits no other)."""


def median(values: list[float]) -> float:
    """The median: the middle value of the sorted values, the mean of the two middle ones for an even
    count; 0 for none."""
    if not values:
        return 0.0
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


@dataclass(frozen=True)
class LoadSnapshot:
    """rlhf.v1.LoadInfo's figures (see protos/rlhf/v1/inference.proto)."""

    user_in_flight: int
    user_waiting: int
    trainer_in_flight: int
    trainer_waiting: int
    user_ttft_p50_s: float
    user_ttft_samples: int
    ttft_window_s: float
    user_quiet_s: float
    user_requests: int


class LoadTicket:
    """One admitted request's place in the counts."""

    __slots__ = ("_first", "_left", "_tracker", "arrived_at", "source")

    def __init__(self, tracker: LoadTracker, source: str, arrived_at: float):
        self._tracker = tracker
        self.source = source
        self.arrived_at = arrived_at
        self._first = False
        self._left = False

    def first_token(self, now: float) -> None:
        """The request's first token came (idempotent)."""
        if self._first or self._left:
            return
        self._first = True
        self._tracker._first_token(self, now - self.arrived_at, now)

    def leave(self) -> None:
        """The request finished, was aborted or failed (idempotent)."""
        if self._left:
            return
        self._left = True
        self._tracker._leave(self, waiting=not self._first)


class LoadTracker:
    def __init__(
        self,
        ttft_window_s: float = 10.0,
        ttft_kept: int = 256,
        clock: Callable[[], float] = time.monotonic,
        waiting_after_s: float = 0.25,
    ):
        self.ttft_window_s = ttft_window_s
        self.waiting_after_s = waiting_after_s
        self.clock = clock
        self.user_before_first: dict[LoadTicket, float] = {}
        """User requests in flight without their first token -> when they arrived (at most the user
        requests in flight, which admission bounds)."""
        self.in_flight = dict.fromkeys(SOURCES, 0)
        self.waiting = dict.fromkeys(SOURCES, 0)
        self.user_ttfts: collections.deque[tuple[float, float]] = collections.deque(maxlen=ttft_kept)
        """(when, seconds) of the most recent user first tokens, at most ``ttft_kept``."""
        self.user_requests = 0
        self._user_busy_until = clock()
        """When a user request was last in flight (the start, while none came)."""

    def enter(self, source: str, arrived_at: float) -> LoadTicket:
        if source not in self.in_flight:
            raise ValueError(f"unknown source {source!r}")
        self.in_flight[source] += 1
        self.waiting[source] += 1
        ticket = LoadTicket(self, source, arrived_at)
        if source == "user":
            self.user_requests += 1
            self.user_before_first[ticket] = arrived_at
        self._gauges(source)
        return ticket

    def _first_token(self, ticket: LoadTicket, ttft_s: float, now: float) -> None:
        self.waiting[ticket.source] -= 1
        if ticket.source == "user":
            self.user_ttfts.append((now, ttft_s))
            self.user_before_first.pop(ticket, None)
        self._gauges(ticket.source)

    def _leave(self, ticket: LoadTicket, waiting: bool) -> None:
        self.in_flight[ticket.source] -= 1
        if waiting:
            self.waiting[ticket.source] -= 1
        if ticket.source == "user":
            self._user_busy_until = self.clock()
            self.user_before_first.pop(ticket, None)
        self._gauges(ticket.source)

    def _gauges(self, source: str) -> None:
        metrics.IN_FLIGHT_BY_SOURCE.labels(source).set(self.in_flight[source])
        metrics.WAITING_FIRST_TOKEN.labels(source).set(self.waiting[source])

    def snapshot(self) -> LoadSnapshot:
        now = self.clock()
        recent = [s for at, s in self.user_ttfts if now - at <= self.ttft_window_s]
        return LoadSnapshot(
            user_in_flight=self.in_flight["user"],
            user_waiting=sum(1 for at in self.user_before_first.values() if now - at >= self.waiting_after_s),
            trainer_in_flight=self.in_flight["trainer"],
            trainer_waiting=self.waiting["trainer"],
            user_ttft_p50_s=median(recent),
            user_ttft_samples=len(recent),
            ttft_window_s=self.ttft_window_s,
            user_quiet_s=0.0 if self.in_flight["user"] else max(0.0, now - self._user_busy_until),
            user_requests=self.user_requests,
        )
