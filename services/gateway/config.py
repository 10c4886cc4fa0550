"""Configuration of the HTTP gateway (environment variables RLHF_GATEWAY_*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from shared.config import ServiceConfig


@dataclass(frozen=True)
class GatewayConfig(ServiceConfig):
    ENV_PREFIX: ClassVar[str] = "RLHF_GATEWAY_"

    port: int = 8000
    """HTTP port of the OpenAI-compatible API, the chat page, /healthz and /metrics."""
    inference_address: str = "127.0.0.1:50051"
    """host:port of the inference service's gRPC server."""
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
        if self.max_body_bytes < 1024:
            out.append("RLHF_GATEWAY_MAX_BODY_BYTES must be at least 1024")
        return out
