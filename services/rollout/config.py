"""Configuration of the rollout service (environment variables RLHF_ROLLOUT_*)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from services.rollout.evidence import GateSettings
from services.rollout.lifecycle import MODES
from shared.config import KafkaConfig, ModelStoreConfig, ServiceConfig, VersionTrustConfig


@dataclass(frozen=True)
class RolloutConfig(ServiceConfig):
    ENV_PREFIX: ClassVar[str] = "RLHF_ROLLOUT_"

    kafka: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)
    """Kafka settings (RLHF_KAFKA_*): candidates in from rlhf.policy-candidates, evidence from
    rlhf.feedback and rlhf.completions, steps out on rlhf.rollout (and read back at start), pointer
    announcements out on rlhf.policy-canary and rlhf.policy-updates."""
    model_store: ModelStoreConfig = dataclasses.field(default_factory=ModelStoreConfig)
    """Where the policy versions and their pointers live (RLHF_MODEL_STORE_*)."""
    versions: VersionTrustConfig = dataclasses.field(default_factory=VersionTrustConfig)
    """RLHF_VERSIONS_POLICY_SIGNING_KEY(_FILE): the rollout service's OWN key (not the trainer's),
    which signs the canary and current pointers' announcements; RLHF_VERSIONS_POLICY_VERIFY_KEY(S/_FILE):
    the keys candidates must be signed with (the trainer's)."""
    grpc_port: int = 50055
    """Port of the RolloutService gRPC server (status, promote, rollback, pause, resume, mode)."""
    metrics_port: int = 9105
    """Port of the Prometheus /metrics endpoint; 0 disables it."""
    canary_share: float = 0.1
    """Share of principals (and conversations) routed to a canary, in (0, 1)."""
    alpha: float = 0.05
    """Error rate of the live gate: the chance of rolling back a canary as good as the stable version,
    or of promoting one worse than the margin (split across the signals with data)."""
    margin: float = 0.05
    """Non-inferiority margin on every [0, 1] signal: a canary is promoted once it is shown to be at
    most this much worse than the stable version (0.05 = 5 points of thumbs-up rate)."""
    rho: float = 25.0
    """Where the always-valid confidence sequences are tightest (about 4 x rho observations per arm)."""
    min_ratings: int = 30
    """Ratings of the canary on its primary signal (thumbs, else Likert, else side by side) before it
    may be promoted."""
    max_latency_ratio: float = 1.5
    """Roll back when the canary's median time to first token, or its median time per output token
    after the first (TPOT), exceeds the stable version's by this factor; neither depends on how long
    the answers are (a canary that answers at more or less length is not slower or faster for it)."""
    min_latency_samples: int = 100
    """Completions of each version before the latency ratio is judged: a median of a few dozen
    requests moves by half on a busy machine or right after an engine swapped."""
    timeout_s: float = 3600.0
    """Roll back a canary the gate could not decide on within this many seconds."""
    tick_s: float = 1.0
    """How often the live gate looks at the evidence (it is valid however often it looks)."""
    initial_mode: str = "auto"
    """Mode on a first start (no steps on rlhf.rollout yet): auto (the gate decides) or manual
    (operators decide); afterwards the mode is the one the steps left (`rlhf rollout mode`)."""
    max_votes: int = 200_000
    """Most live votes (principal, target) remembered to apply revisions; older ones are forgotten."""
    recent_steps: int = 50
    """Most recent rollout steps kept for Status."""

    def gate_settings(self) -> GateSettings:
        return GateSettings(
            alpha=self.alpha,
            margin=self.margin,
            rho=self.rho,
            min_ratings=self.min_ratings,
            max_latency_ratio=self.max_latency_ratio,
            min_latency_samples=self.min_latency_samples,
            timeout_s=self.timeout_s,
        )

    def problems(self) -> list[str]:
        out = super().problems()
        p = self.ENV_PREFIX
        if not 0 < self.canary_share < 1:
            out.append(f"{p}CANARY_SHARE={self.canary_share}: must be in (0, 1)")
        if not 0 < self.alpha < 1:
            out.append(f"{p}ALPHA={self.alpha}: must be in (0, 1)")
        if not 0 <= self.margin < 1:
            out.append(f"{p}MARGIN={self.margin}: must be in [0, 1)")
        if self.rho <= 0:
            out.append(f"{p}RHO={self.rho}: must be positive")
        if self.min_latency_samples < 1:
            out.append(f"{p}MIN_LATENCY_SAMPLES={self.min_latency_samples}: must be at least 1")
        if self.min_ratings < 1:
            out.append(f"{p}MIN_RATINGS={self.min_ratings}: must be at least 1")
        if self.max_latency_ratio < 1:
            out.append(f"{p}MAX_LATENCY_RATIO={self.max_latency_ratio}: must be at least 1")
        if self.timeout_s <= 0:
            out.append(f"{p}TIMEOUT_S={self.timeout_s}: must be positive")
        if not 0 < self.tick_s <= 60:
            out.append(f"{p}TICK_S={self.tick_s}: must be in (0, 60]")
        if self.initial_mode not in MODES:
            out.append(f"{p}INITIAL_MODE={self.initial_mode!r}: expected auto or manual")
        if self.max_votes < 1:
            out.append(f"{p}MAX_VOTES={self.max_votes}: must be at least 1")
        if not 1 <= self.recent_steps <= 1000:
            out.append(f"{p}RECENT_STEPS={self.recent_steps}: must be in [1, 1000]")
        if not self.kafka.servers:
            out.append("RLHF_KAFKA_BOOTSTRAP_SERVERS must be set: every rollout step is a Kafka event")
        out += self.versions.missing(self.host, signs=("policy",), follows=("policy",))
        return out
