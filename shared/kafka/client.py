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
    }


def producer_kwargs(cfg: KafkaConfig, service: str) -> dict[str, Any]:
    return {
        **client_kwargs(cfg, service),
        # Every acknowledged record is on all in-sync replicas.
        "acks": "all",
        "retries": 5,
        "retry_backoff_ms": 200,
        # Keep order under retries.
        "max_in_flight_requests_per_connection": 1,
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
