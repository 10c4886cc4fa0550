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
offsets      the next Kafka offset to read per (topic, partition), written in the SAME transaction
             as the records it covers. So the state is always exactly "everything before these
             offsets": a crash between two batches replays nothing twice and skips nothing, and a
             fresh state file (lost volume) rebuilds itself by reading the topics from the start.

One connection, used from the learner's thread; a lock makes the odd read from another thread (a
test, a metrics scrape) safe too.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from shared.events import CompletionEvent, FeedbackEvent, Message
from shared.kafka.envelope import from_dict

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
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition));
"""


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
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: transactions are explicit (BEGIN ... COMMIT in ``ingest``).
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed batch survives a power cut
        self._db.executescript(SCHEMA)

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
                        "INSERT INTO votes (user_id, target, feedback_id, revision, received_at, arrived_at, event) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, target) DO UPDATE SET "
                        "feedback_id = excluded.feedback_id, revision = excluded.revision, "
                        "received_at = excluded.received_at, arrived_at = excluded.arrived_at, "
                        "event = excluded.event, dropped_at = NULL "
                        "WHERE (excluded.revision, excluded.received_at) > (votes.revision, votes.received_at)",
                        (
                            ev.user_id,
                            ev.target,
                            ev.feedback_id,
                            ev.revision,
                            ev.received_at,
                            now,
                            json.dumps(dataclasses.asdict(ev)),
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
            }


def _completion(row: Any) -> StoredCompletion:
    rid, version, messages, text = row
    return StoredCompletion(rid, version, tuple(Message(m["role"], m["content"]) for m in json.loads(messages)), text)
