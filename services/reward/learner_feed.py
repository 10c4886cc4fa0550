"""Kafka side of the learner: read rlhf.feedback and rlhf.completions into it, exactly once.

No consumer group: the learner assigns itself every partition of both topics and starts each at
the offset stored in its own state (learner_state.py), or at the beginning of the topic when the
state has none (first start, or a lost state file: the state is rebuilt from the topics, as far as
their retention reaches). The offsets after a batch are written in the same SQLite transaction as
the batch's records, which is stronger than "commit to Kafka after the work": a crash at any point
neither skips a record nor stores one twice. A record that is not a valid envelope is counted and
skipped by the consumer layer (decode_or_skip), and its offset is still stored.

Lag (rlhf_reward_learner_consumer_lag{topic}) = end offsets - positions, refreshed by ``update_lag``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kafka import KafkaConsumer, TopicPartition

from services.reward import metrics
from shared.config import KafkaConfig
from shared.kafka.client import consumer_kwargs
from shared.kafka.consumer import decode_or_skip, wait_for_partitions
from shared.kafka.topics import COMPLETIONS, FEEDBACK
from shared.logging import get_logger, log_event

log = get_logger(__name__)

Ingest = Callable[[Sequence[object], dict[tuple[str, int], int]], None]


class LearnerFeed:
    def __init__(
        self,
        cfg: KafkaConfig,
        stored_offsets: dict[tuple[str, int], int],
        topics: Sequence[str] = (FEEDBACK, COMPLETIONS),
        *,
        poll_timeout_ms: int = 500,
        max_records: int = 1000,
    ):
        self.topics = tuple(topics)
        self.poll_timeout_ms = poll_timeout_ms
        self.max_records = max_records
        self._consumer = KafkaConsumer(**consumer_kwargs(cfg, "reward-learner", group_id=None))
        self._parts: list[TopicPartition] = []
        for topic in self.topics:
            self._parts += [TopicPartition(topic, p) for p in sorted(wait_for_partitions(self._consumer, topic))]
        self._consumer.assign(self._parts)
        ends = self._consumer.end_offsets(self._parts)
        resumed = 0
        for tp in self._parts:
            offset = stored_offsets.get((tp.topic, tp.partition))
            if offset is not None and offset > ends[tp]:
                # The topic is shorter than what we read of it: it was recreated (e.g. the embedded,
                # memory-only broker restarted). Its records are all new to us.
                log_event(
                    log,
                    "topic is behind the stored offset (recreated?): reading it from the start",
                    level=30,
                    topic=tp.topic,
                    partition=tp.partition,
                    stored=offset,
                    end=ends[tp],
                )
                offset = None
            if offset is None:
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, offset)
                resumed += 1
        log_event(
            log,
            "learner feed assigned",
            partitions=len(self._parts),
            resumed=resumed,
            from_beginning=len(self._parts) - resumed,
        )

    def poll(self, ingest: Ingest) -> int:
        """Read one batch and hand its payloads with the offsets after them to ``ingest``; returns
        the number of records read (bad ones included)."""
        batches = self._consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
        payloads: list[object] = []
        offsets: dict[tuple[str, int], int] = {}
        count = 0
        for tp, records in batches.items():
            for record in records:
                count += 1
                env = decode_or_skip(record)
                if env is not None:
                    payloads.append(env.payload)
                offsets[(tp.topic, tp.partition)] = record.offset + 1
        if count:
            try:
                ingest(payloads, offsets)
            except BaseException:
                # Nothing of the batch was stored: read it again next time.
                for tp, records in batches.items():
                    if records:
                        self._consumer.seek(tp, records[0].offset)
                raise
        return count

    def update_lag(self) -> dict[str, int]:
        ends = self._consumer.end_offsets(self._parts)
        lag = {t: 0 for t in self.topics}
        for tp in self._parts:
            lag[tp.topic] += max(0, ends[tp] - self._consumer.position(tp))
        for topic, n in lag.items():
            metrics.CONSUMER_LAG.labels(topic).set(n)
        return lag

    def close(self) -> None:
        self._consumer.close()
