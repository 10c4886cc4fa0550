"""Configuration of the feedback service (environment variables RLHF_FEEDBACK_*)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from shared.config import FeedbackTokenConfig, KafkaConfig, ServiceConfig


@dataclass(frozen=True)
class FeedbackConfig(ServiceConfig):
    ENV_PREFIX: ClassVar[str] = "RLHF_FEEDBACK_"

    kafka: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)
    """Kafka settings (RLHF_KAFKA_*): ratings to rlhf.feedback, refusals to rlhf.feedback.dlq."""
    token: FeedbackTokenConfig = dataclasses.field(default_factory=FeedbackTokenConfig)
    """The HMAC key that feedback tokens are verified with (RLHF_FEEDBACK_TOKEN_*)."""
    grpc_port: int = 50052
    """Port of the FeedbackService gRPC server."""
    metrics_port: int = 9102
    """Port of the Prometheus /metrics endpoint; 0 disables it."""
    max_comment_chars: int = 2000
    """Longest comment accepted."""
    publish_linger_ms: float = 1.0
    """How long the Kafka producer holds a rating for others to share its produce request
    (librdkafka linger.ms). Longer: fewer, larger requests, less CPU in this service and the
    broker per rating; shorter: a rating is acknowledged sooner. Guarantees are the same either
    way (acks=all, idempotence, an answer only after Kafka's acknowledgement). The gateway's
    batches hand ratings over in groups, so the short default costs no measurable CPU against a
    longer linger and acknowledges each rating sooner (see docs/benchmarks.md)."""

    ledger_max_votes: int = 500_000
    """Most ratings the ledger keeps in memory (those received within the feedback token lifetime,
    RLHF_FEEDBACK_TOKEN_TTL_S, plus LEDGER_SLACK_S; about 0.85 KB each, comments not kept: 500,000
    hold some 420 MB, tests/benchmarks/bench_feedback_ledger.py). When full, a new rating evicts the
    oldest (rlhf_feedback_ledger_evicted_total): a retry of an evicted rating is written again, and a
    vote on a target the ledger no longer knows is numbered above every evicted revision, so
    revisions still never go backwards."""
    ledger_slack_s: float = 300.0
    """Seconds the ledger keeps a rating beyond the token lifetime: room for clock skew between the
    gateway that issues tokens and this service. At start only the ratings of that window are
    replayed from rlhf.feedback."""
    dlq_rate_per_s: float = 50.0
    """Most refused submissions copied to rlhf.feedback.dlq per second on average (a token bucket);
    the rest are counted (rlhf_feedback_dlq_dropped_total{limit="rate"}) and not copied. 0 copies none."""
    dlq_burst: int = 200
    """Refused submissions the dead-letter copy may take at once above that rate."""
    dlq_bytes_per_s: int = 262_144
    """Most bytes of dead-letter copies per second on average (each copy is at most 8 KiB of the raw
    submission); the burst is one second's worth (rlhf_feedback_dlq_dropped_total{limit="bytes"})."""

    def problems(self) -> list[str]:
        out = super().problems()
        p = self.ENV_PREFIX
        if self.ledger_max_votes < 1:
            out.append(f"{p}LEDGER_MAX_VOTES={self.ledger_max_votes}: expected at least 1")
        if self.ledger_slack_s < 0:
            out.append(f"{p}LEDGER_SLACK_S={self.ledger_slack_s}: must not be negative")
        if self.dlq_rate_per_s < 0 or self.dlq_burst < 0 or self.dlq_bytes_per_s < 0:
            out.append(f"{p}DLQ_RATE_PER_S, {p}DLQ_BURST and {p}DLQ_BYTES_PER_S must not be negative")
        if not self.token.secret:
            out.append("RLHF_FEEDBACK_TOKEN_SECRET must be set: feedback tokens cannot be verified without it")
        if not 0 <= self.publish_linger_ms <= 1000:
            out.append(f"RLHF_FEEDBACK_PUBLISH_LINGER_MS={self.publish_linger_ms}: expected 0 to 1000 (milliseconds)")
        if not self.kafka.servers:
            out.append("RLHF_KAFKA_BOOTSTRAP_SERVERS must be set: a rating is accepted only once Kafka has it")
        return out
