"""Configuration of the HTTP gateway (environment variables RLHF_GATEWAY_*)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from shared.config import FeedbackTokenConfig, ServiceConfig


@dataclass(frozen=True)
class GatewayConfig(ServiceConfig):
    ENV_PREFIX: ClassVar[str] = "RLHF_GATEWAY_"

    port: int = 8000
    """HTTP port of the OpenAI-compatible API, the chat page, /healthz and /metrics."""
    inference_address: str = "127.0.0.1:50051"
    """host:port of the inference service's gRPC server."""
    feedback_address: str = ""
    """host:port of the feedback service's gRPC server (e.g. 127.0.0.1:50052); empty turns
    POST /v1/feedback off (503). `rlhf up` sets it."""
    token: FeedbackTokenConfig = dataclasses.field(default_factory=FeedbackTokenConfig)
    """The HMAC key the gateway signs each served response's feedback token with (RLHF_FEEDBACK_TOKEN_*)."""
    api_keys: tuple[str, ...] = ()
    """Accepted bearer tokens (comma-separated); empty accepts every request (local use)."""
    max_body_bytes: int = 1 << 20
    """Largest request body; larger ones get HTTP 413."""
    request_timeout_s: float = 300.0
    """Deadline of one generation call to the inference service."""

    def problems(self) -> list[str]:
        out = super().problems()
        if not 0 <= self.port <= 65535:
            out.append(f"RLHF_GATEWAY_PORT={self.port}: not a port number")
        if ":" not in self.inference_address:
            out.append(f"RLHF_GATEWAY_INFERENCE_ADDRESS={self.inference_address!r}: expected host:port")
        if self.feedback_address and not self.token.secret:
            out.append(
                "RLHF_FEEDBACK_TOKEN_SECRET must be set when RLHF_GATEWAY_FEEDBACK_ADDRESS is "
                "(responses carry signed feedback tokens)"
            )
        if self.max_body_bytes < 1024:
            out.append("RLHF_GATEWAY_MAX_BODY_BYTES must be at least 1024")
        return out
