"""Replicas of one group take a new version one at a time: a lease the group's replicas share.

    lease = SwapLease(Path("/models"), "policy.current", holder_id(), ttl_s=600)
    with lease.held(stopping):       # waits while another replica of the group holds it
        ...                          # report NOT_SERVING, drain, reload, report SERVING

The lease is a small JSON file ``<name>.swap-lease`` (``{"holder": ..., "expires_at": ...}``) in a
directory every replica of the group can write: the model store's root on one machine, a shared
volume on Kubernetes. Taking and giving back the lease is a read-modify-write under an exclusive
``flock`` of ``<name>.swap-lease.lock`` (between the processes of a machine, and on NFSv4 where
Linux turns it into a byte-range lock), and the record is written by an atomic rename, so two
replicas never both hold it and a reader never sees half a record.

The rule (``may_take``): a replica may take the lease when nobody holds it, when it holds it itself,
or when the holder's lease has expired (``ttl_s`` after it was taken: the holder died mid-swap). A
record that cannot be read counts as no holder (logged): a lost lease file must not stop swaps.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.inference import metrics
from shared.logging import get_logger, log_event

log = get_logger(__name__)

SUFFIX = ".swap-lease"


def holder_id() -> str:
    """This process's name on leases: host, pid and a random part (unique even across restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    expires_at: float
    """Unix time after which another replica may take the lease over."""


def may_take(current: LeaseRecord | None, holder: str, now: float) -> bool:
    """Whether ``holder`` may take the lease at ``now``: nobody holds it, ``holder`` does, or the
    holder's lease has expired (``expires_at <= now``)."""
    return current is None or current.holder == holder or current.expires_at <= now


class LeaseAbandoned(Exception):
    """The replica stopped while it waited for the lease."""


class SwapLease:
    def __init__(
        self,
        directory: Path,
        name: str,
        holder: str,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.time,
    ):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.path = Path(directory) / f"{name}{SUFFIX}"
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.holder = holder
        self.ttl_s = ttl_s
        self.clock = clock

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def read(self) -> LeaseRecord | None:
        """The current record, or None when there is none (or it cannot be read: logged)."""
        try:
            doc = json.loads(self.path.read_text())
            return LeaseRecord(str(doc["holder"]), float(doc["expires_at"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log_event(log, "unreadable swap lease: taken as free", level=30, path=str(self.path), error=str(exc))
            return None

    def try_take(self) -> bool:
        """Take the lease if ``may_take`` allows it now; True when this replica holds it."""
        with self._locked():
            now = self.clock()
            current = self.read()
            if not may_take(current, self.holder, now):
                return False
            if current is not None and current.holder != self.holder:
                metrics.SWAP_LEASE_TAKEOVERS.inc()
                log_event(log, "took over an expired swap lease", level=30, path=str(self.path), holder=current.holder)
            tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps({"holder": self.holder, "expires_at": now + self.ttl_s}))
            os.replace(tmp, self.path)
            return True

    def release(self) -> None:
        """Give the lease back (only if this replica still holds it)."""
        with self._locked():
            current = self.read()
            if current is not None and current.holder == self.holder:
                self.path.unlink(missing_ok=True)

    @contextmanager
    def held(self, stopping: threading.Event | None = None, poll_s: float = 0.2) -> Iterator[float]:
        """Hold the lease for the block, waiting for it first; yields the seconds waited. Raises
        LeaseAbandoned when ``stopping`` is set while waiting."""
        started = time.monotonic()
        stopping = stopping or threading.Event()
        while not self.try_take():
            if stopping.wait(poll_s):
                raise LeaseAbandoned(f"stopped while waiting for {self.path}")
        waited = time.monotonic() - started
        metrics.SWAP_LEASE_WAIT_SECONDS.observe(waited)
        try:
            yield waited
        finally:
            self.release()
