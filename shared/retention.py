"""Retention of the model store: keep the versions that matter, remove the rest on a schedule.

Every published version stays until nothing needs it. A version of a line is **kept** when it is

- pointed at: ``<line>.current``, ``.candidate``, ``.canary`` (what serves, waits, runs as canary);
- the last announced version of a pointer (``<line>.announced``, ``<line>.<pointer>-announced``):
  what replicas serve, and what a starting replica loads;
- a rollback target: one of the ``keep_ancestors`` versions behind a pointed or announced version
  along ``parent`` links (the previous current, then the one before);
- among the ``keep_last`` newest versions of the line;
- pinned: listed in a pin record ``<line>.pinned`` (an operator's) or ``<line>.pinned-<holder>``
  (a service's own, e.g. the trainer's KL reference and the reward models it loads), or named by the
  caller (``extra``);
- the base of a kept adapter version (``extra.adapter.base_version`` of its manifest), transitively;
- younger than the grace age (``retention_grace_s``): a consumer may still be loading it.

Everything else is removed (``ModelStore.remove``: renamed out of the listing, then deleted),
oldest first, each removal logged. ``versions_to_remove`` is the rule, a pure function;
``RetentionSweeper.sweep`` reads the store, applies it, removes, and sets
``rlhf_model_store_bytes{line}`` (bytes the line holds) and the counters. When the store cannot be
read whole (a malformed pointer or pin record), nothing is removed that round.

Pin record (JSON): ``{"pins": {"policy-0003": "why it is kept", ...}}``; ``pin_versions`` writes
a holder's record, replacing its previous one.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from shared.config import ModelStoreConfig
from shared.logging import get_logger, log_event
from shared.model_store import POINTERS, TMP_PREFIX, ModelStore, ModelStoreError, version_number

log = get_logger(__name__)

BYTES_HELD = Gauge("rlhf_model_store_bytes", "Bytes held by the versions of a line (at the last sweep)", ["line"])
VERSIONS_HELD = Gauge("rlhf_model_store_versions", "Versions of a line in the store (at the last sweep)", ["line"])
VERSIONS_REMOVED = Counter(
    "rlhf_model_store_versions_removed_total", "Versions removed by retention (each logged)", ["line"]
)
BYTES_REMOVED = Counter("rlhf_model_store_bytes_removed_total", "Bytes freed by retention", ["line"])
TEMPORARIES_REMOVED = Counter(
    "rlhf_model_store_temporaries_removed_total",
    "Leftovers of crashed publishes, record writes and removals (.tmp-*) deleted by retention",
)
TEMPORARY_BYTES_REMOVED = Counter(
    "rlhf_model_store_temporary_bytes_removed_total", "Bytes freed by deleting leftover .tmp-* entries"
)
SWEEP_FAILURES = Counter(
    "rlhf_model_store_retention_failures_total",
    "Sweeps that removed nothing because the store could not be read",
    ["line"],
)

PIN_RECORD = "pinned"
"""The operator's pin record of a line: ``<line>.pinned``; a service's is ``<line>.pinned-<holder>``."""
ANNOUNCED_RECORDS = ("announced", "candidate-announced", "canary-announced")
"""The announcement records of a line's pointers (shared/version_line.py)."""


@dataclass(frozen=True)
class RetentionRule:
    """How much of a line is kept besides what is protected (see the module docstring)."""

    keep_last: int = 5
    keep_ancestors: int = 2
    grace_s: float = 3600.0

    @classmethod
    def of(cls, cfg: ModelStoreConfig) -> RetentionRule:
        return cls(cfg.keep_last, cfg.keep_ancestors, cfg.retention_grace_s)


@dataclass(frozen=True)
class StoredVersion:
    """What the rule needs to know of one version."""

    version: str
    created_at: float
    """Unix time of publication (the manifest's)."""
    parent: str | None = None
    base_version: str | None = None
    """The full-weight version an adapter version applies to; None for full weights."""
    bytes: int = 0


def versions_to_remove(
    versions: Sequence[StoredVersion],
    protected: Mapping[str, str],
    rollback_from: Collection[str],
    rule: RetentionRule,
    now: float,
) -> list[str]:
    """The versions to remove, oldest first.

    Rule: keep = ``protected`` (pointers, announcements, pins: version -> why)
    + up to ``rule.keep_ancestors`` parents along ``parent`` links behind each of ``rollback_from``
    + the ``rule.keep_last`` highest-numbered versions + every version with
    ``now - created_at < rule.grace_s``; then the bases of kept adapter versions, until nothing
    changes. Remove = every other version of ``versions``.
    """
    return sorted(set(_by_name(versions)) - set(kept_versions(versions, protected, rollback_from, rule, now)),
                  key=version_number)  # fmt: skip


def stale_temporaries(entries: Mapping[str, float], grace_s: float, now: float) -> list[str]:
    """The store's ``.tmp-*`` entries left by a crash, to delete: name -> the newest modification
    time inside the entry (a publish still writing keeps touching it).

    Rule: ``name`` starts with ``.tmp-`` and ``now - newest_mtime >= grace_s``. A publish, a record
    write or a removal in progress writes into its temporary continuously, so only an entry that no
    process has touched for the grace age (an hour by default) is a crash's leftover.
    """
    return sorted(n for n, mtime in entries.items() if n.startswith(TMP_PREFIX) and now - mtime >= grace_s)


def _newest_mtime(path: os.PathLike[str] | str) -> float:
    """The newest modification time of ``path`` and, for a directory, of everything inside it."""
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except OSError:
                    continue
    return newest


def _entry_bytes(path: os.PathLike[str] | str) -> int:
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def remove_stale_temporaries(store: ModelStore, grace_s: float, now: float) -> list[str]:
    """Delete the store's crash leftovers (``stale_temporaries``); returns their names."""
    entries: dict[str, float] = {}
    for entry in store.root.iterdir() if store.root.is_dir() else []:
        if entry.name.startswith(TMP_PREFIX):
            try:
                entries[entry.name] = _newest_mtime(entry)
            except OSError:
                continue  # gone meanwhile (its writer finished or another sweeper took it)
    removed = []
    for name in stale_temporaries(entries, grace_s, now):
        path = store.root / name
        try:
            size = _entry_bytes(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log_event(log, "retention: could not delete a leftover", level=30, entry=name, error=str(exc))
            continue
        removed.append(name)
        TEMPORARIES_REMOVED.inc()
        TEMPORARY_BYTES_REMOVED.inc(size)
        log_event(log, "retention: deleted a crash leftover", entry=name, bytes=size)
    return removed


def kept_versions(
    versions: Sequence[StoredVersion],
    protected: Mapping[str, str],
    rollback_from: Collection[str],
    rule: RetentionRule,
    now: float,
) -> dict[str, str]:
    """Each version kept by ``versions_to_remove``'s rule, with the first reason that keeps it."""
    by_name = _by_name(versions)
    kept: dict[str, str] = {v: why for v, why in protected.items() if v in by_name}
    for start in rollback_from:
        version = by_name.get(start)
        for depth in range(rule.keep_ancestors):
            if version is None or version.parent is None or version.parent not in by_name:
                break
            kept.setdefault(version.parent, f"rollback target {depth + 1} behind {start}")
            version = by_name[version.parent]
    for name in sorted(by_name, key=version_number)[-rule.keep_last :]:
        kept.setdefault(name, f"among the last {rule.keep_last}")
    for name, v in by_name.items():
        if now - v.created_at < rule.grace_s:
            kept.setdefault(name, f"younger than the grace age ({rule.grace_s:g} s)")
    todo = list(kept)
    while todo:
        base = by_name[todo.pop()].base_version
        if base is not None and base in by_name and base not in kept:
            kept[base] = "base of a kept adapter"
            todo.append(base)
    return kept


def _by_name(versions: Iterable[StoredVersion]) -> dict[str, StoredVersion]:
    return {v.version: v for v in versions}


# --- pins -------------------------------------------------------------------------------------------


def pin_versions(store: ModelStore, line: str, holder: str, pins: Mapping[str, str]) -> None:
    """Replace ``holder``'s pin record of ``line`` (``<line>.pinned-<holder>``) with ``pins``
    (version -> why); retention keeps each of them while the record names it."""
    store.write_line_record(line, f"{PIN_RECORD}-{holder}", {"pins": dict(pins)})


def read_pins(store: ModelStore, line: str) -> dict[str, str]:
    """Every pin of ``line`` (the operator's record and each holder's): version -> why.
    ModelStoreError when a record is malformed (then nothing should be removed)."""
    out: dict[str, str] = {}
    if not store.root.is_dir():
        return out
    for path in sorted(store.root.glob(f"{line}.{PIN_RECORD}*")):
        name = path.name.split(".", 1)[1]
        if name != PIN_RECORD and not name.startswith(f"{PIN_RECORD}-"):
            continue
        doc = store.read_line_record(line, name)
        pins = (doc or {}).get("pins", {})
        if not isinstance(pins, dict) or not all(isinstance(k, str) for k in pins):
            raise ModelStoreError(f'{path.name}: expected {{"pins": {{"<version>": "<why>"}}}}')
        holder = name.removeprefix(PIN_RECORD).lstrip("-") or "operator"
        for version, why in pins.items():
            out.setdefault(version, f"pinned by {holder}: {why}")
    return out


# --- the sweeper ------------------------------------------------------------------------------------


class RetentionSweeper:
    """Applies the rule to one line of a store: ``sweep`` once, or ``start`` a thread that sweeps
    every ``interval_s``. ``extra`` returns more versions to keep (version -> why), asked at each
    sweep (e.g. the trainer's reference and lineage head)."""

    def __init__(
        self,
        store: ModelStore,
        line: str,
        rule: RetentionRule,
        *,
        extra: Callable[[], Mapping[str, str]] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.line = line
        self.rule = rule
        self.extra = extra or dict
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def protected(self) -> tuple[dict[str, str], set[str]]:
        """(version -> why it is kept, the versions whose rollback targets are kept); ModelStoreError
        when a pointer, announcement or pin record cannot be read."""
        line, store = self.line, self.store
        keep: dict[str, str] = {}
        for name in sorted(POINTERS):
            version = store.pointer(line, name)
            if version is not None:
                keep.setdefault(version, f"{line}.{name}")
        for record in ANNOUNCED_RECORDS:
            doc = store.read_line_record(line, record)
            if doc is not None and isinstance(doc.get("version"), str):
                keep.setdefault(doc["version"], f"{line}.{record}")
        rollback_from = set(keep)
        for version, why in {**read_pins(store, line), **dict(self.extra())}.items():
            keep.setdefault(version, why)
        return keep, rollback_from

    def stored(self) -> list[StoredVersion]:
        """The line's versions as the rule sees them (an unreadable manifest: kept, created now)."""
        out = []
        for version in self.store.versions(self.line):
            try:
                m = self.store.manifest(version)
                adapter = m.extra.get("adapter")
                base = adapter.get("base_version") if isinstance(adapter, dict) else None
                size = self.store.version_bytes(version)
                out.append(
                    StoredVersion(version, m.created_at, m.parent, base if isinstance(base, str) else None, size)
                )
            except (ModelStoreError, OSError):
                out.append(StoredVersion(version, self.clock(), None, None, 0))  # never removed this round
        return out

    def sweep(self) -> list[str]:
        """Remove what the rule lets go (and the store's stale ``.tmp-*`` crash leftovers); returns
        the versions removed."""
        try:
            remove_stale_temporaries(self.store, self.rule.grace_s, self.clock())
        except OSError as exc:
            log_event(log, "retention: could not list the store's leftovers", level=30, error=str(exc))
        try:
            protected, rollback_from = self.protected()
        except (ModelStoreError, OSError, ValueError) as exc:
            SWEEP_FAILURES.labels(self.line).inc()
            log_event(
                log, "retention: the store could not be read; nothing removed", level=30, line=self.line, error=str(exc)
            )
            return []
        versions = self.stored()
        doomed = versions_to_remove(versions, protected, rollback_from, self.rule, self.clock())
        removed = []
        sizes = {v.version: v.bytes for v in versions}
        for version in doomed:
            try:
                freed = self.store.remove(version)
            except (ModelStoreError, OSError) as exc:
                log_event(log, "retention: could not remove a version", level=30, version=version, error=str(exc))
                continue
            removed.append(version)
            sizes.pop(version, None)
            VERSIONS_REMOVED.labels(self.line).inc()
            BYTES_REMOVED.labels(self.line).inc(freed)
            log_event(log, "retention: removed a version", version=version, bytes=freed)
        BYTES_HELD.labels(self.line).set(sum(sizes.values()))
        VERSIONS_HELD.labels(self.line).set(len(sizes))
        if removed:
            log_event(
                log,
                "retention sweep",
                line=self.line,
                removed=len(removed),
                kept=len(sizes),
                bytes_held=sum(sizes.values()),
            )
        return removed

    def start(self, interval_s: float) -> RetentionSweeper:
        """Sweep now and then every ``interval_s`` on a daemon thread, until ``stop``."""
        if interval_s <= 0:
            log_event(log, "retention off: every version is kept", line=self.line)
            return self
        self._thread = threading.Thread(
            target=self._run, args=(interval_s,), name=f"retention-{self.line}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self, interval_s: float) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # retention must never take its service down
                log.exception("retention sweep failed (line %s)", self.line)
            self._stop.wait(interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
