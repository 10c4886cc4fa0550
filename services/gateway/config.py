"""Configuration of the HTTP gateway (environment variables RLHF_GATEWAY_*)."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from services.gateway.identity import load_keyring
from shared.config import FeedbackTokenConfig, KafkaConfig, ServiceConfig
from shared.grpc_channels import replica_target


@dataclass(frozen=True)
class GatewayConfig(ServiceConfig):
    ENV_PREFIX: ClassVar[str] = "RLHF_GATEWAY_"

    port: int = 8000
    """HTTP port of the OpenAI-compatible API, the chat page, /healthz and (unless
    RLHF_GATEWAY_METRICS_ON_API_PORT=0) /metrics."""
    inference_address: str = "127.0.0.1:50051"
    """The inference service's stable group: `host:port` of one replica, or every replica of the
    group: `ip1:port1,ip2:port2` or `dns:///name:port` (a name resolving to each replica, e.g. a
    headless Kubernetes Service). Calls go round robin to the replicas reporting SERVING, so a
    replica that drains and reloads a new version gets no new requests meanwhile."""
    canary_inference_address: str = ""
    """The canary group of inference replicas (same forms as RLHF_GATEWAY_INFERENCE_ADDRESS): the
    share of principals/conversations the rollout service sets (rlhf.rollout) goes there while a
    canary runs. Empty: no canary routing, every request goes to the stable group."""
    side_by_side: bool = True
    """While a canary runs, an n=2 request routed to the canary gets one answer from the canary and
    one from the stable version (in random order, each with its own response_id, policy_version and
    feedback token), so that users compare the two versions side by side."""
    kafka: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)
    """Kafka settings (RLHF_KAFKA_*): the gateway follows rlhf.rollout (the routing state and the
    /flywheel page). No bootstrap servers: no rollout events, every request to the stable group."""
    rollout_catch_up_s: float = 10.0
    """At start, how long the gateway waits to have read rlhf.rollout to its end before it serves
    (until then, and if Kafka is not reachable, every request goes to the stable group)."""
    rollout_address: str = ""
    """host:port of the rollout service's gRPC server: /flywheel shows its live figures (Status: what
    users said about the stable version and the canary since the canary started). Empty: the figures
    of the latest rollout event carrying them."""
    flywheel_events: int = 50
    """Recent rollout events the gateway keeps for the /flywheel page (a bounded list)."""
    feedback_address: str = ""
    """host:port of the feedback service's gRPC server (e.g. 127.0.0.1:50052); empty turns
    POST /v1/feedback off (503). `rlhf up` sets it."""
    token: FeedbackTokenConfig = dataclasses.field(default_factory=FeedbackTokenConfig)
    """The HMAC key the gateway signs each served response's feedback token with (RLHF_FEEDBACK_TOKEN_*)."""
    api_keys: str = ""
    """API keys as comma-separated `name:key` pairs (e.g. from a Kubernetes Secret); each name is the
    principal its key's requests are served for. Keys: at least 24 printable ASCII characters;
    names: letters, digits, `.`, `_`, `-`. A malformed value (an empty entry, a key without a name,
    a duplicate name or key, a short key) stops the gateway at start."""
    api_keys_file: Path | None = None
    """A file of API keys hashed at rest: one `name sha256:<hex of the key>` per line (`#` comments);
    adds to RLHF_GATEWAY_API_KEYS. `rlhf up` writes one."""
    anonymous: bool = False
    """Serve callers without a key too: each gets a principal `anon:<random>` kept by a session
    cookie (the chat page, or any HTTP client that keeps cookies). Required to start without keys on
    a host other than loopback (fail closed); `rlhf up` turns it on for loopback."""
    session_secret: str = ""
    """HMAC key of the session cookies (at least 32 characters). Empty: derived from
    RLHF_FEEDBACK_TOKEN_SECRET (shared by the replicas already), else random per process (sessions
    then end with the process)."""
    session_ttl_s: int = 7 * 24 * 3600
    """How long a session cookie (a login, or an anonymous principal) stays valid, in seconds."""
    public_docs: bool = False
    """Serve /docs and /openapi.json without a key even when keys are configured."""
    metrics_on_api_port: bool = True
    """Serve /metrics on the API port too; 0 serves it on RLHF_GATEWAY_METRICS_PORT only (set one)."""
    chat_rate_per_min: float = 600.0
    """Chat completions per minute per principal (token bucket refill); 0 turns the limit off."""
    chat_burst: int = 60
    """Chat completions a principal may send at once (token bucket size)."""
    feedback_rate_per_min: float = 1200.0
    """Ratings per minute per principal (token bucket refill); 0 turns the limit off."""
    feedback_burst: int = 120
    """Ratings a principal may send at once (token bucket size)."""
    rate_limit_principals: int = 100_000
    """Principals whose buckets are kept (LRU map per limit); one pushed out starts with a full bucket."""
    max_body_bytes: int = 1 << 20
    """Largest request body; larger ones get HTTP 413 before any of it is parsed."""
    body_timeout_s: float = 30.0
    """Seconds a request's whole body may take to arrive after its head; a later one gets HTTP 408
    and the connection is closed."""
    header_timeout_s: float = 10.0
    """Seconds a client may take to send a complete request head (request line and headers) after
    opening the connection or starting a request on a kept-alive one; then the connection is closed."""
    max_header_bytes: int = 64 * 1024
    """Largest request head (request line and headers, bytes); a larger one gets HTTP 431 and the
    connection is closed."""
    keep_alive_s: int = 5
    """Seconds an idle kept-alive connection stays open between requests (uvicorn's timeout_keep_alive)."""
    max_concurrency: int = 2048
    """Connections and requests in progress (uvicorn's limit_concurrency, counted apart) past which a
    new request gets HTTP 503 at once instead of queueing; bounds the gateway's memory under a flood."""
    feedback_queue_max: int = 4096
    """Ratings that may wait in the gateway for a call to the feedback service (the batcher's queue);
    a rating arriving when it is full gets HTTP 429 with Retry-After."""
    request_timeout_s: float = 300.0
    """Deadline of one generation call to the inference service."""

    def problems(self) -> list[str]:
        out = super().problems()
        if not 0 <= self.port <= 65535:
            out.append(f"RLHF_GATEWAY_PORT={self.port}: not a port number")
        out += _address_problems("RLHF_GATEWAY_INFERENCE_ADDRESS", self.inference_address)
        if self.canary_inference_address:
            out += _address_problems("RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS", self.canary_inference_address)
            if not self.kafka.servers:
                out.append(
                    "RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS needs RLHF_KAFKA_BOOTSTRAP_SERVERS: the canary's share "
                    "comes from the rollout events on rlhf.rollout"
                )
        if self.rollout_address:
            out += _address_problems("RLHF_GATEWAY_ROLLOUT_ADDRESS", self.rollout_address)
        if self.rollout_catch_up_s < 0:
            out.append(f"RLHF_GATEWAY_ROLLOUT_CATCH_UP_S={self.rollout_catch_up_s}: must not be negative")
        if not 1 <= self.flywheel_events <= 10_000:
            out.append(f"RLHF_GATEWAY_FLYWHEEL_EVENTS={self.flywheel_events}: expected 1 to 10000")
        if self.feedback_address and not self.token.secret:
            out.append(
                "RLHF_FEEDBACK_TOKEN_SECRET must be set when RLHF_GATEWAY_FEEDBACK_ADDRESS is "
                "(responses carry signed feedback tokens)"
            )
        if self.max_body_bytes < 1024:
            out.append("RLHF_GATEWAY_MAX_BODY_BYTES must be at least 1024")
        for variable, seconds in (
            ("RLHF_GATEWAY_BODY_TIMEOUT_S", self.body_timeout_s),
            ("RLHF_GATEWAY_HEADER_TIMEOUT_S", self.header_timeout_s),
        ):
            if not 0 < seconds <= 3600:
                out.append(f"{variable}={seconds}: expected more than 0 and at most 3600 seconds")
        if not 1 <= self.keep_alive_s <= 3600:
            out.append(f"RLHF_GATEWAY_KEEP_ALIVE_S={self.keep_alive_s}: expected 1 to 3600 seconds")
        if not 1024 <= self.max_header_bytes <= 1 << 20:
            out.append(f"RLHF_GATEWAY_MAX_HEADER_BYTES={self.max_header_bytes}: expected 1024 to 1048576")
        if self.max_concurrency < 8:
            out.append(f"RLHF_GATEWAY_MAX_CONCURRENCY={self.max_concurrency}: must be at least 8")
        if self.feedback_queue_max < 1:
            out.append(f"RLHF_GATEWAY_FEEDBACK_QUEUE_MAX={self.feedback_queue_max}: must be at least 1")
        return out + self._identity_problems()

    def _identity_problems(self) -> list[str]:
        out = []
        try:
            keys = load_keyring(self.api_keys, self.api_keys_file)
        except ValueError as exc:
            return [str(exc)]
        if not keys and not self.anonymous and not is_loopback(self.host):
            out.append(
                f"RLHF_GATEWAY_HOST={self.host} is not loopback and no API keys are set: set "
                "RLHF_GATEWAY_API_KEYS or RLHF_GATEWAY_API_KEYS_FILE, or RLHF_GATEWAY_ANONYMOUS=1 to "
                "serve anyone explicitly"
            )
        if self.session_secret and len(self.session_secret) < 32:
            out.append("RLHF_GATEWAY_SESSION_SECRET must be at least 32 characters")
        if self.session_ttl_s < 60:
            out.append(f"RLHF_GATEWAY_SESSION_TTL_S={self.session_ttl_s}: expected at least 60 seconds")
        if not self.metrics_on_api_port and not self.metrics_port:
            out.append(
                "RLHF_GATEWAY_METRICS_ON_API_PORT=0 needs RLHF_GATEWAY_METRICS_PORT: /metrics would be served nowhere"
            )
        for name, rate, burst in (
            ("CHAT", self.chat_rate_per_min, self.chat_burst),
            ("FEEDBACK", self.feedback_rate_per_min, self.feedback_burst),
        ):
            if rate < 0:
                out.append(f"RLHF_GATEWAY_{name}_RATE_PER_MIN={rate}: must not be negative (0 turns it off)")
            if burst < 1:
                out.append(f"RLHF_GATEWAY_{name}_BURST={burst}: must be at least 1")
        if self.rate_limit_principals < 1:
            out.append(f"RLHF_GATEWAY_RATE_LIMIT_PRINCIPALS={self.rate_limit_principals}: must be at least 1")
        return out


def _address_problems(variable: str, address: str) -> list[str]:
    """What is wrong with a gRPC address setting of one replica or several (see replica_target)."""
    if ":" not in address:
        return [f"{variable}={address!r}: expected host:port, ip1:port1,ip2:port2 or dns:///name:port"]
    try:
        replica_target(address)
    except ValueError as exc:
        return [f"{variable}={address!r}: {exc}"]
    return []


def is_loopback(host: str) -> bool:
    """True for a host only this machine can reach: localhost, 127.0.0.0/8, ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
