"""Topic administration: create the loop's topics when this project runs the broker."""

from __future__ import annotations

import time

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from shared.config import KafkaConfig
from shared.kafka.client import client_kwargs
from shared.kafka.topics import ALL_TOPICS, POLICY_CANARY, POLICY_CANDIDATES, POLICY_UPDATES, REWARD_MODELS, ROLLOUT
from shared.logging import get_logger, log_event

log = get_logger(__name__)

# Announcements and rollout steps must stay ordered: one partition.
SINGLE_PARTITION = frozenset({POLICY_UPDATES, REWARD_MODELS, POLICY_CANDIDATES, POLICY_CANARY, ROLLOUT})


def ensure_topics(cfg: KafkaConfig, topics: tuple[str, ...] = ALL_TOPICS, timeout_s: float = 30.0) -> None:
    """Create every missing topic; existing ones are left as they are."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(**client_kwargs(cfg, "admin"))
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        for topic in missing:
            partitions = 1 if topic in SINGLE_PARTITION else cfg.topic_partitions
            try:
                admin.create_topics([NewTopic(topic, partitions, cfg.replication_factor)])
            except TopicAlreadyExistsError:
                continue
            log_event(log, "created topic", topic=topic, partitions=partitions)
    finally:
        admin.close()
