"""Kafka side of the learner: read rlhf.feedback and rlhf.completions into it, exactly once.

No consumer group: the learner assigns itself every partition of both topics and starts each at
the offset stored in its own state (retraining_state.py), or at the beginning of the topic when the
state has none (first start, or a lost state file: the state is rebuilt from the topics, as far as
their retention reaches). The offsets after a batch are written in the same SQLite transaction as
the batch's records, which is stronger than "commit to Kafka after the work": a crash at any point
neither skips a record nor stores one twice. A record that is not a valid envelope is counted and
skipped by the consumer layer (decode_or_skip), and its offset is still stored.

Lag (rlhf_reward_learner_consumer_lag{topic}) = end offsets - positions, refreshed by ``update_lag``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from services.reward import metrics
from shared.config import KafkaConfig
from shared.kafka.readers import AssignedReader, Partition, decode_or_skip
from shared.kafka.topics import COMPLETIONS, FEEDBACK
from shared.logging import get_logger

log = get_logger(__name__)

Ingest = Callable[[Sequence[object], dict[Partition, int]], None]


class RatingsFeed:
    def __init__(
        self,
        cfg: KafkaConfig,
        stored_offsets: dict[Partition, int],
        topics: Sequence[str] = (FEEDBACK, COMPLETIONS),
        *,
        poll_timeout_ms: int = 500,
        max_records: int = 1000,
        identities: Mapping[Partition, str] | None = None,
        adopt_identities: Callable[[dict[Partition, str]], object] | None = None,
        identity_check_s: float = 5.0,
    ):
        """``identities``: stored with the offsets; ``adopt_identities`` is called with the topics'
        identities at start and whenever they change (a recreated topic), before the records read
        after that are ingested (retraining_state.RetrainingState.adopt_identities)."""
        self.topics = tuple(topics)
        self._reader = AssignedReader(
            cfg,
            "reward-learner",
            self.topics,
            start=stored_offsets,
            poll_timeout_ms=poll_timeout_ms,
            max_records=max_records,
            identities=identities,
            identity_check_s=identity_check_s,
        )
        self._adopt = adopt_identities
        self._adopted: dict[Partition, str] = {}
        self._adopt_changed()

    def _adopt_changed(self) -> None:
        current = self._reader.identities
        if self._adopt is not None and current != self._adopted:
            self._adopt(current)
            self._adopted = current

    def poll(self, ingest: Ingest) -> int:
        """Read one batch and hand its payloads with the offsets after them to ``ingest``; returns
        the number of records read (bad ones included)."""
        records = self._reader.poll()
        self._adopt_changed()  # a recreated topic: its offsets dropped (and a new vote epoch) before its records
        if not records:
            return 0
        payloads: list[object] = []
        offsets: dict[Partition, int] = {}
        first: dict[Partition, int] = {}
        for record in records:
            env = decode_or_skip(record)
            if env is not None:
                payloads.append(env.payload)
            part = (record.topic, record.partition)
            first.setdefault(part, record.offset)
            offsets[part] = record.offset + 1
        try:
            ingest(payloads, offsets)
        except BaseException:
            # Nothing of the batch was stored: read it again next time.
            for part, offset in first.items():
                self._reader.seek(part, offset)
            raise
        return len(records)

    def update_lag(self) -> dict[str, int]:
        lag = self._reader.lag()
        for topic, n in lag.items():
            metrics.CONSUMER_LAG.labels(topic).set(n)
        return lag

    def close(self) -> None:
        self._reader.close()
