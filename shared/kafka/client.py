"""Construction of Kafka clients from KafkaConfig, in one place: kafka-python for most clients,
confluent-kafka (librdkafka, C) where one process moves thousands of records a second (the
feedback service's acks=all publisher and its ledger reader)."""

from __future__ import annotations

from typing import Any

from shared.config import KafkaConfig


def security_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """kafka-python's settings for RLHF_KAFKA_SECURITY_PROTOCOL and the TLS and SASL settings.

    PLAINTEXT adds nothing; SSL adds the CA (and client certificate) files; SASL_* adds the mechanism,
    user name and password (read from its file now).
    """
    out: dict[str, Any] = {"security_protocol": cfg.security_protocol}
    if cfg.uses_tls:
        out["ssl_check_hostname"] = cfg.ssl_check_hostname
        if cfg.ssl_ca_file is not None:
            out["ssl_cafile"] = str(cfg.ssl_ca_file)
        if cfg.ssl_cert_file is not None and cfg.ssl_key_file is not None:
            out["ssl_certfile"] = str(cfg.ssl_cert_file)
            out["ssl_keyfile"] = str(cfg.ssl_key_file)
    if cfg.uses_sasl:
        out["sasl_mechanism"] = cfg.sasl_mechanism
        out["sasl_plain_username"] = cfg.sasl_username
        out["sasl_plain_password"] = cfg.sasl_password_value()
    return out


def rdkafka_security_config(cfg: KafkaConfig) -> dict[str, Any]:
    """The same settings for librdkafka (confluent-kafka)."""
    out: dict[str, Any] = {"security.protocol": cfg.security_protocol.lower()}
    if cfg.uses_tls:
        out["ssl.endpoint.identification.algorithm"] = "https" if cfg.ssl_check_hostname else "none"
        if cfg.ssl_ca_file is not None:
            out["ssl.ca.location"] = str(cfg.ssl_ca_file)
        if cfg.ssl_cert_file is not None and cfg.ssl_key_file is not None:
            out["ssl.certificate.location"] = str(cfg.ssl_cert_file)
            out["ssl.key.location"] = str(cfg.ssl_key_file)
    if cfg.uses_sasl:
        out["sasl.mechanisms"] = cfg.sasl_mechanism
        out["sasl.username"] = cfg.sasl_username
        out["sasl.password"] = cfg.sasl_password_value()
    return out


def client_kwargs(cfg: KafkaConfig, service: str) -> dict[str, Any]:
    if not cfg.servers:
        raise ValueError(
            "RLHF_KAFKA_BOOTSTRAP_SERVERS is empty: set it, or run through `rlhf up`, which starts the embedded broker"
        )
    return {
        "bootstrap_servers": cfg.servers,
        "client_id": f"{cfg.client_id}-{service}",
        "request_timeout_ms": cfg.request_timeout_ms,
        # Constructing a client with the broker down fails after this long instead of 30 s.
        "bootstrap_timeout_ms": cfg.request_timeout_ms,
        **security_kwargs(cfg),
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


# How long librdkafka holds a record for others to share its produce request (its default). At
# 1 ms the feedback path sent so many small requests that its producer thread and the broker spent
# three times the CPU per rating; 5 ms costs a lone rating at most 5 ms of latency.
LINGER_MS = 5


def rdkafka_producer_config(cfg: KafkaConfig, service: str, *, linger_ms: float = LINGER_MS) -> dict[str, Any]:
    """librdkafka settings with the same guarantees as ``producer_kwargs``."""
    if not cfg.servers:
        raise ValueError(
            "RLHF_KAFKA_BOOTSTRAP_SERVERS is empty: set it, or run through `rlhf up`, which starts the embedded broker"
        )
    return {
        "bootstrap.servers": ",".join(cfg.servers),
        "client.id": f"{cfg.client_id}-{service}",
        "acks": "all",
        # Retries without duplicates or reordering; librdkafka caps in-flight requests at 5 for it.
        "enable.idempotence": True,
        "request.timeout.ms": cfg.request_timeout_ms,
        # A record not acknowledged by then fails its delivery report (and so the caller), after
        # which the producer no longer holds it: a caller's retry never races a queued copy.
        "message.timeout.ms": int(cfg.delivery_timeout_s * 1000),
        "linger.ms": linger_ms,
        # Keyed records land on the partition the Java client and kafka-python would choose, so one
        # user's votes stay on one partition whichever client wrote them.
        "partitioner": "murmur2_random",
        # Broker-down reconnect attempts back off to 1 s instead of flooding the log and the CPU.
        "reconnect.backoff.max.ms": 1000,
        **rdkafka_security_config(cfg),
    }


def rdkafka_consumer_config(cfg: KafkaConfig, service: str) -> dict[str, Any]:
    """librdkafka settings for a reader that assigns partitions itself (no group offsets)."""
    if not cfg.servers:
        raise ValueError("RLHF_KAFKA_BOOTSTRAP_SERVERS is empty")
    return {
        "bootstrap.servers": ",".join(cfg.servers),
        "client.id": f"{cfg.client_id}-{service}",
        # librdkafka requires a group id even for assign(); nothing is committed under it.
        "group.id": f"{cfg.client_id}-{service}-unused",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "socket.timeout.ms": max(cfg.request_timeout_ms, 10),
        "reconnect.backoff.max.ms": 1000,
        **rdkafka_security_config(cfg),
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
