"""The rollout service's dataclasses: what Status reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.events import RolloutEvent


@dataclass(frozen=True)
class VerdictView:
    """The live gate's last verdict on the canary."""

    action: str
    """"promote", "rollback" or "continue"."""
    reason: str
    evidence: dict[str, Any]
    at: float


@dataclass(frozen=True)
class SignalsView:
    """What users said about one version since the canary started (EvidenceBook summary)."""

    version: str
    summary: dict[str, Any] = field(default_factory=dict)
    """VersionEvidence.summary(): thumbs_up_rate, thumbs, likert_mean, likerts, completions,
    error_rate, latency_p50_s, latency_p90_s, mean_tokens (None without data)."""


@dataclass(frozen=True)
class StatusView:
    stable: str
    canary: str
    canary_share: float
    canary_since: float
    queued: str
    paused: bool
    mode: str
    sequence: int
    last_verdict: VerdictView | None
    stable_signals: SignalsView
    canary_signals: SignalsView | None
    recent: list[RolloutEvent]
    latest_candidate: str
