"""The supervisor of `rlhf up`: a process that dies is started again, with backoff, until it crash-loops.

What it watches are *units* (``Unit``): each service process of the stack, and the embedded broker
(``kafka``). ``Supervisor.run`` polls them; when one has exited while the stack was not stopping, it
waits ``backoff_s`` (1 s, doubling with every restart of that unit in the crash-loop window, at most
``max_backoff_s``), then restarts it (a service: the same command and settings, back when it reports
healthy; the broker: the same port and storage, then the topics). Each restart is a log line and
``rlhf_up_restarts_total{service}``. A unit restarted ``max_restarts`` times within ``window_s``
that dies again is not restarted: ``run`` returns a ``GiveUp`` naming it, its exit code and its last
output lines, and the stack stops. ``run`` returns None as soon as ``stop`` is set (Ctrl-C, SIGTERM):
nothing is restarted after that.

The logic here knows no processes (tests drive it with stand-in units); flywheel/launcher.py makes
the units.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Protocol

from prometheus_client import Counter

from shared.logging import get_logger, log_event

log = get_logger(__name__)

RESTARTS = Counter(
    "rlhf_up_restarts_total",
    "Restarts of a process of `rlhf up` after it died (service name; kafka: the embedded broker)",
    ["service"],
)

TAIL_LINES = 30
"""How many of a process's last output lines a give-up message quotes (and ``OutputTail`` keeps)."""
TAIL_LINE_CHARS = 400
"""Longer lines are cut to this many characters in the tail."""


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """How the supervisor restarts (RLHF_UP_RESTART_* in flywheel/launcher.py's UpConfig)."""

    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 300.0
    poll_s: float = 0.5


def backoff_s(recent_restarts: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait before the next restart: ``min(max_s, initial_s * 2 ** recent_restarts)``, where
    ``recent_restarts`` counts the unit's restarts within the crash-loop window (so a unit that ran
    well for a whole window starts again at ``initial_s``)."""
    return min(max_s, initial_s * 2 ** min(recent_restarts, 30))


class CrashHistory:
    """When one unit was restarted, within the last ``window_s`` (at most ``max_restarts`` times kept)."""

    def __init__(self, max_restarts: int, window_s: float):
        self.window_s = window_s
        self.max_restarts = max_restarts
        self._times: collections.deque[float] = collections.deque(maxlen=max(1, max_restarts))

    def recent(self, now: float) -> int:
        """Restarts within ``window_s`` before ``now``."""
        return sum(1 for t in self._times if now - t < self.window_s)

    def crash_looping(self, now: float) -> bool:
        """True when ``max_restarts`` restarts already happened within the window: the rule to give up."""
        return self.recent(now) >= self.max_restarts

    def record(self, now: float) -> None:
        self._times.append(now)


class Unit(Protocol):
    """One thing the supervisor keeps running."""

    name: str

    def exit_code(self) -> int | None:
        """The exit code once it has stopped; None while it runs."""
        ...

    def restart(self, stop: threading.Event) -> None:
        """Start it again and return once it works; raise (any exception) when it did not come back.
        Return early when ``stop`` is set."""
        ...

    def last_lines(self) -> list[str]:
        """Its last output lines (for the give-up message); [] when unknown."""
        ...


@dataclasses.dataclass(frozen=True)
class GiveUp:
    """A unit that crash-looped: not restarted again; the stack stops."""

    name: str
    exit_code: int | None
    restarts: int
    window_s: float
    last_lines: tuple[str, ...]

    def message(self) -> str:
        head = (
            f"{self.name} keeps dying (exit code {self.exit_code}; restarted {self.restarts} times within "
            f"{self.window_s:.0f} s): giving up and stopping the stack."
        )
        if not self.last_lines:
            return head
        return head + "\nIts last output lines:\n" + "\n".join(f"  | {line}" for line in self.last_lines)


class Supervisor:
    """Keeps ``units`` running (see the module docstring)."""

    def __init__(
        self,
        units: Sequence[Unit],
        policy: RestartPolicy,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.units = list(units)
        self.policy = policy
        self.clock = clock
        self.histories = {u.name: CrashHistory(policy.max_restarts, policy.window_s) for u in self.units}

    def run(self, stop: threading.Event) -> GiveUp | None:
        """Watch until ``stop`` is set (None) or a unit crash-loops (its GiveUp)."""
        while not stop.wait(self.policy.poll_s):
            for unit in self.units:
                if stop.is_set():
                    return None
                code = unit.exit_code()
                if code is None:
                    continue
                gave_up = self.handle_exit(unit, code, stop)
                if gave_up:
                    return gave_up
        return None

    def handle_exit(self, unit: Unit, code: int, stop: threading.Event) -> GiveUp | None:
        """``unit`` exited with ``code``: give up (crash loop), or wait the backoff and restart it."""
        history = self.histories[unit.name]
        now = self.clock()
        if history.crash_looping(now):
            return GiveUp(unit.name, code, history.recent(now), self.policy.window_s, tuple(unit.last_lines()))
        delay = backoff_s(history.recent(now), self.policy.initial_backoff_s, self.policy.max_backoff_s)
        log_event(
            log,
            "process died; restarting it",
            level=logging.WARNING,
            service=unit.name,
            exit_code=code,
            restart_in_s=round(delay, 1),
            restarts_in_window=history.recent(now),
        )
        if stop.wait(delay):
            return None
        history.record(self.clock())
        RESTARTS.labels(unit.name).inc()
        started = self.clock()
        try:
            unit.restart(stop)
        except Exception as exc:  # noqa: BLE001 - any failure to come back counts as another crash, next poll
            log_event(log, "restart failed", level=logging.ERROR, service=unit.name, error=str(exc))
            return None
        if not stop.is_set():
            log_event(log, "process restarted", service=unit.name, start_s=round(self.clock() - started, 1))
        return None


# --- the last output lines of a process --------------------------------------------------------


def tail_lines(path: Path, n: int = TAIL_LINES, max_bytes: int = 64 * 1024) -> list[str]:
    """The last ``n`` lines of a text file (read from its last ``max_bytes``), each cut to
    ``TAIL_LINE_CHARS``; [] when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode(errors="replace").splitlines()
    return [line[:TAIL_LINE_CHARS] for line in lines[-n:]]


class OutputTail:
    """Copies a child's output (a pipe) to ``sink`` line by line in a daemon thread, keeping its last
    ``n`` lines (a bounded deque) for a give-up message."""

    def __init__(self, n: int = TAIL_LINES):
        self.lines: collections.deque[str] = collections.deque(maxlen=n)

    def pump(self, stream: IO[bytes], sink: IO[bytes] | None) -> threading.Thread:
        def copy() -> None:
            nonlocal sink
            with stream:
                for raw in iter(stream.readline, b""):
                    self.lines.append(raw.decode(errors="replace").rstrip("\n")[:TAIL_LINE_CHARS])
                    if sink is not None:
                        try:
                            sink.write(raw)
                            sink.flush()
                        except (OSError, ValueError):  # the terminal went away: keep draining the pipe
                            sink = None

        thread = threading.Thread(target=copy, name="output-tail", daemon=True)
        thread.start()
        return thread

    def last(self) -> list[str]:
        return list(self.lines)
