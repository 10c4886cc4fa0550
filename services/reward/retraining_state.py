"""The continual learner's durable state: one SQLite file (stdlib sqlite3, JSON columns, no pickle).

What it keeps, and why it is enough to lose nothing across a restart:

votes        the live vote per (user_id, target): a later revision replaces an earlier one, a
             duplicate delivery changes nothing (same rule as comparisons.latest_revisions). A vote
             whose completions never arrived is marked dropped (``dropped_at``) and left out.
completions  user-facing completions by response_id (messages, response text, policy version):
             the text a vote is about. Trainer rollouts (source "trainer") are never rated, so they
             are not stored.
trained      which comparisons (by comparison key, see learner.py) a published RM version was
             trained on, and when: the learner's "new" vs "replay" split and its latency metric.
raters       per principal: its agreement scores (raters.py) and status: ok, quarantined (by the
             rule, with the reason) or released (by an operator). Survives restarts, so a
             quarantined principal stays out until an operator releases it.
rm_verdicts  per comparison: how many of its pairs the RM current at the time ordered the rater's
             way (scored once, by that version): the RM agreement of its principal.
offsets      the next Kafka offset to read per (topic, partition), written in the SAME transaction
             as the records it covers. So the state is always exactly "everything before these
             offsets": a crash between two batches replays nothing twice and skips nothing, and a
             fresh state file (lost volume) rebuilds itself by reading the topics from the start.
identities   per (topic, partition), the identity of the topic the offsets belong to
             (shared.kafka.readers.partition_identity). A recreated topic (the memory-only broker
             restarted) is read from its start (``adopt_identities`` drops its offsets), and its
             votes form a new *epoch*: the feedback service numbers revisions from 1 again on a new
             topic, so a vote of a newer epoch supersedes one of an older epoch whatever their
             revisions; within an epoch the higher (revision, received_at) wins.
meta         the model store the state belongs to (``store_id``, shared.store_identity) and the
             vote epoch. A state file of another store is moved aside at open (kept as
             ``<file>.store-<its id>``, logged) and a fresh one started, which rebuilds itself from
             the topics: the trained comparisons and RM verdicts name versions of that other store.

One connection, used from the learner's thread; a lock makes the odd read from another thread (a
test, a metrics scrape) safe too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from services.reward.domain import RaterRecord
from services.reward.raters import OK, QUARANTINED, RELEASED, RaterScore
from shared.errors import FailedPrecondition, NotFound
from shared.events import CompletionEvent, FeedbackEvent, Message
from shared.kafka.envelope import from_dict
from shared.kafka.readers import carried_identity, was_recreated
from shared.kafka.topics import FEEDBACK
from shared.logging import get_logger, log_event

log = get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    user_id TEXT NOT NULL, target TEXT NOT NULL, feedback_id TEXT NOT NULL, revision INTEGER NOT NULL,
    received_at REAL NOT NULL, arrived_at REAL NOT NULL, event TEXT NOT NULL, dropped_at REAL,
    PRIMARY KEY (user_id, target));
CREATE TABLE IF NOT EXISTS completions (
    response_id TEXT PRIMARY KEY, policy_version TEXT NOT NULL, messages TEXT NOT NULL,
    completion_text TEXT NOT NULL, created_at REAL NOT NULL, arrived_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS completions_arrived ON completions (arrived_at);
CREATE TABLE IF NOT EXISTS trained (
    key TEXT PRIMARY KEY, version TEXT NOT NULL, trained_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS raters (
    principal TEXT PRIMARY KEY, status TEXT NOT NULL DEFAULT 'ok', reason TEXT NOT NULL DEFAULT '',
    peer_agreement REAL, peer_items INTEGER NOT NULL DEFAULT 0, rm_agreement REAL,
    rm_items INTEGER NOT NULL DEFAULT 0, comparisons INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL, status_at REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rm_verdicts (
    key TEXT PRIMARY KEY, principal TEXT NOT NULL, version TEXT NOT NULL, agree REAL NOT NULL,
    pairs INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS rm_verdicts_principal ON rm_verdicts (principal);
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS identities (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, identity TEXT NOT NULL,
    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
STORE_ID = "store_id"
VOTE_EPOCH = "vote_epoch"


@dataclasses.dataclass(frozen=True)
class StoredCompletion:
    """What the RM needs of a completion (duck-types CompletionEvent for comparisons.join_texts)."""

    response_id: str
    policy_version: str
    messages: tuple[Message, ...]
    completion_text: str


@dataclasses.dataclass(frozen=True)
class StoredVote:
    event: FeedbackEvent
    arrived_at: float
    """Wall-clock time the learner first stored this revision (starts the pending timeout)."""


class RetrainingState:
    def __init__(self, path: Path, store_id: str | None = None):
        """``store_id``: the model store this state belongs to; a state of another store is moved
        aside and a fresh one started (module docstring)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = self._open()
        if store_id is not None:
            stamped = self._meta(STORE_ID)
            if stamped is not None and stamped != store_id:
                self._db.close()
                self._move_aside(stamped, store_id)
                self._db = self._open()
            self._set_meta(STORE_ID, store_id)
        self._epoch = int(self._meta(VOTE_EPOCH) or 0)

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN ... COMMIT in ``ingest``).
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a committed batch survives a power cut
        db.executescript(SCHEMA)
        if "epoch" not in {row[1] for row in db.execute("PRAGMA table_info(votes)")}:
            db.execute("ALTER TABLE votes ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0")  # a state from before epochs
        return db

    def _move_aside(self, stamped: str, store_id: str) -> None:
        """Keep another store's state file (and its WAL) as ``<file>.store-<its id>``."""
        aside = self.path.with_name(f"{self.path.name}.store-{stamped}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, Path(f"{aside}{suffix}"))
        log_event(
            log,
            "learner state belongs to another model store: moved aside, starting a fresh state "
            "(rebuilt from the topics)",
            level=30,
            state_store=stamped,
            store=store_id,
            moved_to=str(aside),
        )

    def _meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    @property
    def store_id(self) -> str | None:
        return self._meta(STORE_ID)

    @property
    def vote_epoch(self) -> int:
        """Incremented each time the feedback topic is found recreated (module docstring)."""
        return self._epoch

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writing: one transaction per polled batch ------------------------------------------------

    def ingest(
        self,
        feedback: Iterable[FeedbackEvent],
        completions: Iterable[CompletionEvent],
        offsets: dict[tuple[str, int], int],
        now: float,
    ) -> None:
        """Store a batch of events and the offsets after them, atomically."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for ev in feedback:
                    db.execute(
                        "INSERT INTO votes (user_id, target, feedback_id, revision, received_at, arrived_at, event, "
                        "epoch) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, target) DO UPDATE SET "
                        "feedback_id = excluded.feedback_id, revision = excluded.revision, "
                        "received_at = excluded.received_at, arrived_at = excluded.arrived_at, "
                        "event = excluded.event, dropped_at = NULL, epoch = excluded.epoch "
                        "WHERE (excluded.epoch, excluded.revision, excluded.received_at) "
                        "> (votes.epoch, votes.revision, votes.received_at)",
                        (
                            ev.user_id,
                            ev.target,
                            ev.feedback_id,
                            ev.revision,
                            ev.received_at,
                            now,
                            json.dumps(dataclasses.asdict(ev)),
                            self._epoch,
                        ),
                    )
                for c in completions:
                    db.execute(
                        "INSERT OR IGNORE INTO completions (response_id, policy_version, messages, completion_text, "
                        "created_at, arrived_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            c.response_id,
                            c.policy_version,
                            json.dumps([dataclasses.asdict(m) for m in c.messages]),
                            c.completion_text,
                            c.created_at,
                            now,
                        ),
                    )
                db.executemany(
                    "INSERT INTO offsets (topic, partition, next_offset) VALUES (?, ?, ?) "
                    "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                    [(t, p, o) for (t, p), o in offsets.items()],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def mark_dropped(self, keys: Sequence[tuple[str, str]], now: float) -> None:
        """Leave these votes (user_id, target) out from now on (their completions never came)."""
        with self._lock:
            self._db.executemany(
                "UPDATE votes SET dropped_at = ? WHERE user_id = ? AND target = ?", [(now, u, t) for u, t in keys]
            )

    def mark_trained(self, keys: Iterable[str], version: str, now: float) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR IGNORE INTO trained (key, version, trained_at) VALUES (?, ?, ?)",
                [(k, version, now) for k in keys],
            )

    def prune_completions(self, older_than: float) -> int:
        """Forget completions that arrived before ``older_than`` and that no live vote is about."""
        with self._lock:
            rated = {
                r["response_id"]
                for (ev,) in self._db.execute("SELECT event FROM votes WHERE dropped_at IS NULL")
                for r in json.loads(ev)["responses"]
            }
            old = [
                rid
                for (rid,) in self._db.execute(
                    "SELECT response_id FROM completions WHERE arrived_at < ?", (older_than,)
                )
                if rid not in rated
            ]
            self._db.executemany("DELETE FROM completions WHERE response_id = ?", [(r,) for r in old])
            return len(old)

    # --- reading --------------------------------------------------------------------------------

    def offsets(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return {(t, p): o for t, p, o in self._db.execute("SELECT topic, partition, next_offset FROM offsets")}

    def identities(self) -> dict[tuple[str, int], str]:
        """The identity of the topic each partition's offset belongs to (give them to the reader)."""
        with self._lock:
            return {(t, p): i for t, p, i in self._db.execute("SELECT topic, partition, identity FROM identities")}

    def adopt_identities(self, current: Mapping[tuple[str, int], str]) -> list[tuple[str, int]]:
        """Record the reader's identities (``AssignedReader.identities``), in one transaction: a
        partition whose topic was recreated (``was_recreated``) loses its stored offset, and a
        recreated feedback topic starts a new vote epoch. Returns the recreated partitions."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                stored = {(t, p): i for t, p, i in db.execute("SELECT topic, partition, identity FROM identities")}
                recreated = [part for part, ident in current.items() if was_recreated(stored.get(part), ident)]
                db.executemany("DELETE FROM offsets WHERE topic = ? AND partition = ?", recreated)
                db.executemany(
                    "INSERT INTO identities (topic, partition, identity) VALUES (?, ?, ?) "
                    "ON CONFLICT (topic, partition) DO UPDATE SET identity = excluded.identity",
                    [(t, p, carried_identity(stored.get((t, p)), i)) for (t, p), i in current.items()],
                )
                epoch = self._epoch + 1 if any(t == FEEDBACK for t, _ in recreated) else self._epoch
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (VOTE_EPOCH, str(epoch)),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._epoch = epoch
        if recreated:
            log_event(
                log,
                "topics recreated since the stored offsets: read again from the start",
                level=30,
                partitions=",".join(f"{t}/{p}" for t, p in recreated),
                vote_epoch=epoch,
            )
        return recreated

    def live_votes(self) -> list[StoredVote]:
        """Every live vote not dropped, oldest arrival first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT event, arrived_at FROM votes WHERE dropped_at IS NULL ORDER BY arrived_at, rowid"
            ).fetchall()
        return [StoredVote(from_dict(FeedbackEvent, json.loads(ev)), arrived) for ev, arrived in rows]

    def completions(self, response_ids: Iterable[str]) -> dict[str, StoredCompletion]:
        ids = list(set(response_ids))
        out: dict[str, StoredCompletion] = {}
        with self._lock:
            for start in range(0, len(ids), 500):  # SQLite caps the number of ? parameters
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row in self._db.execute(
                    f"SELECT response_id, policy_version, messages, completion_text "
                    f"FROM completions WHERE response_id IN ({marks})",
                    chunk,
                ):
                    out[row[0]] = _completion(row)
        return out

    def recent_completions(self, limit: int) -> list[StoredCompletion]:
        """The ``limit`` most recently arrived completions (the RM's normalisation reference)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT response_id, policy_version, messages, completion_text FROM completions "
                "ORDER BY arrived_at DESC, rowid DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_completion(r) for r in rows]

    def trained_keys(self) -> dict[str, str]:
        """Comparison key -> the first RM version trained on it."""
        with self._lock:
            return dict(self._db.execute("SELECT key, version FROM trained"))

    def counts(self) -> dict[str, int]:
        with self._lock:
            one = lambda sql: self._db.execute(sql).fetchone()[0]
            return {
                "votes": one("SELECT COUNT(*) FROM votes WHERE dropped_at IS NULL"),
                "dropped_votes": one("SELECT COUNT(*) FROM votes WHERE dropped_at IS NOT NULL"),
                "completions": one("SELECT COUNT(*) FROM completions"),
                "trained_comparisons": one("SELECT COUNT(*) FROM trained"),
                "quarantined_raters": one(f"SELECT COUNT(*) FROM raters WHERE status = '{QUARANTINED}'"),
            }

    # --- raters ---------------------------------------------------------------------------------

    def record_rm_verdicts(self, rows: Iterable[tuple[str, str, str, float, int]]) -> None:
        """Store (comparison key, principal, rm version, pairs agreed, pairs); a key scored before keeps
        its first verdict."""
        with self._lock:
            self._db.executemany(
                "INSERT OR IGNORE INTO rm_verdicts (key, principal, version, agree, pairs) VALUES (?, ?, ?, ?, ?)",
                list(rows),
            )

    def rm_verdict_keys(self) -> set[str]:
        with self._lock:
            return {k for (k,) in self._db.execute("SELECT key FROM rm_verdicts")}

    def rm_agreement_totals(self) -> dict[str, tuple[float, int]]:
        """principal -> (pairs the RM ordered its way, pairs scored), over all its verdicts."""
        with self._lock:
            rows = self._db.execute("SELECT principal, SUM(agree), SUM(pairs) FROM rm_verdicts GROUP BY principal")
            return {p: (float(a), int(n)) for p, a, n in rows}

    def update_raters(self, scores: Mapping[str, tuple[RaterScore, int]], now: float) -> None:
        """Store each principal's scores and number of live comparisons; its status is left as it is
        (a new principal starts ok)."""
        with self._lock:
            self._db.executemany(
                "INSERT INTO raters (principal, peer_agreement, peer_items, rm_agreement, rm_items, comparisons, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (principal) DO UPDATE SET "
                "peer_agreement = excluded.peer_agreement, peer_items = excluded.peer_items, "
                "rm_agreement = excluded.rm_agreement, rm_items = excluded.rm_items, "
                "comparisons = excluded.comparisons, updated_at = excluded.updated_at",
                [
                    (p, _real(s.peer_agreement), s.peer_items, _real(s.rm_agreement), s.rm_items, n, now)
                    for p, (s, n) in scores.items()
                ],
            )

    def quarantine(self, principal: str, reason: str, now: float) -> bool:
        """Quarantine a principal whose status is ok (never one an operator released); True if it was."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE raters SET status = ?, reason = ?, status_at = ? WHERE principal = ? AND status = ?",
                (QUARANTINED, reason, now, principal, OK),
            )
            return cur.rowcount == 1

    def release(self, principal: str, now: float) -> RaterRecord:
        """An operator's release: the principal's ratings count again and the rule no longer judges it.
        Raises NotFound for an unknown principal, FailedPrecondition for one not quarantined."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE raters SET status = ?, reason = ?, status_at = ? WHERE principal = ? AND status = ?",
                (RELEASED, "released by an operator", now, principal, QUARANTINED),
            )
            if cur.rowcount != 1:
                row = self._db.execute("SELECT status FROM raters WHERE principal = ?", (principal,)).fetchone()
                if row is None:
                    raise NotFound(f"no rater {principal!r} is known to the retraining loop", param="principal")
                raise FailedPrecondition(f"rater {principal!r} is {row[0]}, not quarantined", param="principal")
        record = self.rater(principal)
        assert record is not None  # updated just now
        return record

    def rater(self, principal: str) -> RaterRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_RATER_COLUMNS} FROM raters WHERE principal = ?", (principal,)).fetchone()
        return _rater(row) if row else None

    def raters(self, status: str | None = None, limit: int = 100) -> list[RaterRecord]:
        """Raters (of one status, or all), quarantined first, then lowest agreement first."""
        where, args = ("WHERE status = ?", [status]) if status else ("", [])
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_RATER_COLUMNS} FROM raters {where} ORDER BY status != '{QUARANTINED}', "
                "COALESCE(peer_agreement, rm_agreement, 1.0), principal LIMIT ?",
                [*args, limit],
            ).fetchall()
        return [_rater(r) for r in rows]

    def rater_statuses(self) -> dict[str, str]:
        """principal -> status, for every principal not ok (quarantined or released)."""
        with self._lock:
            return dict(self._db.execute("SELECT principal, status FROM raters WHERE status != ?", (OK,)))

    def rater_counts(self) -> dict[str, int]:
        """status -> principals."""
        with self._lock:
            counts = dict(self._db.execute("SELECT status, COUNT(*) FROM raters GROUP BY status"))
        return {s: int(counts.get(s, 0)) for s in (OK, QUARANTINED, RELEASED)}


_RATER_COLUMNS = (
    "principal, status, reason, peer_agreement, peer_items, rm_agreement, rm_items, comparisons, updated_at, status_at"
)


def _real(x: float) -> float | None:
    return None if math.isnan(x) else x


def _rater(row: Any) -> RaterRecord:
    p, status, reason, peer, peer_n, rm, rm_n, n, updated, status_at = row
    nan = math.nan
    return RaterRecord(
        p, status, reason, nan if peer is None else peer, peer_n, nan if rm is None else rm, rm_n, n, updated, status_at
    )


def _completion(row: Any) -> StoredCompletion:
    rid, version, messages, text = row
    return StoredCompletion(rid, version, tuple(Message(m["role"], m["content"]) for m in json.loads(messages)), text)
