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

    def problems(self) -> list[str]:
        out = super().problems()
        if not self.token.secret:
            out.append("RLHF_FEEDBACK_TOKEN_SECRET must be set: feedback tokens cannot be verified without it")
        if not 0 <= self.publish_linger_ms <= 1000:
            out.append(f"RLHF_FEEDBACK_PUBLISH_LINGER_MS={self.publish_linger_ms}: expected 0 to 1000 (milliseconds)")
        if not self.kafka.servers:
            out.append("RLHF_KAFKA_BOOTSTRAP_SERVERS must be set: a rating is accepted only once Kafka has it")
        return out
