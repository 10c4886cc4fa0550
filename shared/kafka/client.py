"""Construction of kafka-python clients from KafkaConfig, in one place."""

from __future__ import annotations

from typing import Any

from shared.config import KafkaConfig


def client_kwargs(cfg: KafkaConfig, service: str) -> dict[str, Any]:
    if not cfg.servers:
        raise ValueError("RLHF_KAFKA_BOOTSTRAP_SERVERS is empty: set it, or run through `rlhf up`, "
                         "which starts the embedded broker")
    return {
        "bootstrap_servers": cfg.servers,
        "client_id": f"{cfg.client_id}-{service}",
        "request_timeout_ms": cfg.request_timeout_ms,
        # Constructing a client with the broker down fails after this long instead of 30 s.
        "bootstrap_timeout_ms": cfg.request_timeout_ms,
    }


def producer_kwargs(cfg: KafkaConfig, service: str) -> dict[str, Any]:
    return {
        **client_kwargs(cfg, service),
        # Every acknowledged record is on all in-sync replicas. kafka-python's idempotent producer
        # (its default) retries internally without duplicates or reordering.
        "acks": "all",
        "enable_idempotence": True,
        # A record not acknowledged by then fails its future, so a caller's retry never races a
        # copy still queued inside the producer.
        "delivery_timeout_ms": int(cfg.delivery_timeout_s * 1000),
        "linger_ms": 2,
        # Fail fast to our own retry loop rather than blocking a caller for a minute.
        "max_block_ms": 5000,
    }


def consumer_kwargs(cfg: KafkaConfig, service: str, group_id: str | None) -> dict[str, Any]:
    return {
        **client_kwargs(cfg, service),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
    }
