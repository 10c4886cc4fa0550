"""A replica's private copies of model versions: the bytes it verified are the bytes it loads.

The model store is shared and writable by the publishers (and, if one is compromised, by an
attacker): a version verified in the store could be changed between the check and the load. So a
follower copies each version it accepts into a directory of its own, hashing every file as it is
copied (one read of the store, ``ModelStore.copy_verified``), and the service loads from that copy,
which only this process writes (files read-only, 0444).

    copies = PrivateCopies(Path("/var/cache/rlhf"), "policy")   # <root>/policy-<pid>-<n>/
    path, size = copies.copy(store, "policy-0003", manifest)     # a candidate
    copies.promote(path)      # now served; keeps the served and the previous one, deletes older ones
    copies.discard(path)      # refused or failed to load: deleted at once

Bounded: at most ``keep`` served copies (the served one and the previous, which inference reloads
when a swap fails) plus the one candidate being verified; ``rlhf_version_private_copy_bytes``
shows the bytes held. Each instance's copies live in ``<root>/<line>-<pid>-<n>``, removed on
``close``; those left by a process that died (or by an earlier process with the same pid, e.g. pid 1
in a restarted container) are removed by the next instance made on the same root.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Gauge, Histogram

from shared.logging import get_logger, log_event
from shared.model_store import Manifest, ModelStore

log = get_logger(__name__)

COPY_BYTES = Gauge("rlhf_version_private_copy_bytes", "Bytes of private version copies held", ["line"])
COPIES = Gauge("rlhf_version_private_copies", "Private version copies held (served, previous, candidate)", ["line"])
COPY_SECONDS = Histogram(
    "rlhf_version_private_copy_seconds",
    "Time to copy and hash one version into the private directory",
    ["line"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)

DEFAULT_ROOT = Path(tempfile.gettempdir()) / "rlhf-version-copies"
_LIVE: set[str] = set()
"""Names of the copy directories of this process's instances (another one is a leftover)."""
_COUNTER = itertools.count(1)


class PrivateCopies:
    """The private copies of one line's versions held by this process."""

    def __init__(self, root: Path | None, line: str, keep: int = 2):
        if keep < 1:
            raise ValueError("keep at least the served copy")
        self.root = Path(root) if root else DEFAULT_ROOT
        self.line = line
        self.keep = keep
        self.dir = self.root / f"{line}-{os.getpid()}-{next(_COUNTER)}"
        self._served: list[Path] = []
        """Oldest first; the last is the one served."""
        self._sizes: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._ready = False

    def _prepare(self) -> None:
        """Create this instance's directory, removing the leftovers of dead processes on the root."""
        if self._ready:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for entry in self.root.iterdir():
            if _leftover(entry.name, self.line):
                shutil.rmtree(entry, ignore_errors=True)
        self.dir.mkdir(mode=0o700)
        _LIVE.add(self.dir.name)
        self._ready = True

    def copy(
        self, store: ModelStore, version: str, manifest: Manifest, skip: Callable[[str], bool] | None = None
    ) -> tuple[Path, int]:
        """Copy ``version`` into a new private directory, checking every file against ``manifest``
        on the way (CorruptVersionError otherwise, nothing left behind). (path, bytes copied).
        ``skip``: files left in the store (``ModelStore.copy_verified``)."""
        with self._lock:
            self._prepare()
        started = time.monotonic()
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}"
        size = store.copy_verified(version, manifest, tmp, skip)
        final = self.dir / f"{version}-{uuid.uuid4().hex[:8]}"
        os.rename(tmp, final)
        seconds = time.monotonic() - started
        COPY_SECONDS.labels(self.line).observe(seconds)
        with self._lock:
            self._sizes[final] = size
            self._show()
        log_event(log, "copied version privately", version=version, bytes=size, seconds=round(seconds, 3))
        return final, size

    def promote(self, path: Path) -> None:
        """``path`` is served from now on; copies older than the previous one are deleted."""
        with self._lock:
            if path in self._served:
                self._served.remove(path)
            self._served.append(path)
            while len(self._served) > self.keep:
                self._delete(self._served.pop(0))
            self._show()

    def discard(self, path: Path) -> None:
        """Delete a copy that will not be served (refused, or it failed to load)."""
        with self._lock:
            if path in self._served:
                return  # served (or the previous): kept
            self._delete(path)
            self._show()

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    @property
    def held(self) -> list[Path]:
        with self._lock:
            return sorted(self._sizes)

    def close(self) -> None:
        """Delete every copy (the service has stopped using them)."""
        with self._lock:
            shutil.rmtree(self.dir, ignore_errors=True)
            _LIVE.discard(self.dir.name)
            self._served.clear()
            self._sizes.clear()
            self._ready = False
            self._show()

    def _delete(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        self._sizes.pop(path, None)

    def _show(self) -> None:
        COPY_BYTES.labels(self.line).set(sum(self._sizes.values()))
        COPIES.labels(self.line).set(len(self._sizes))


def _leftover(name: str, line: str) -> bool:
    """Whether ``<line>-<pid>-<n>`` belongs to no running instance: its process is gone, or it has
    this process's pid but none of this process's instances made it (an earlier life of the pid)."""
    parts = name.split("-")
    if len(parts) != 3 or parts[0] != line or not (parts[1].isdigit() and parts[2].isdigit()):
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return name not in _LIVE
    return not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
