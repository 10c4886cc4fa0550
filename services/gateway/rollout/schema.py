"""What GET /v1/flywheel returns (pydantic models): the versions served, their traffic shares and
live ratings, and the rollout decisions as they happen."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

Role = Literal["stable", "canary", "queued"]


class VersionView(BaseModel):
    version: str
    role: Role
    traffic_share: float
    """Share of principals/conversations routed to it (the queued one: 0)."""
    since: float | None = None
    """When it took this role (Unix time), if known."""
    thumbs_up_rate: float | None = None
    thumbs: int = 0
    """Thumbs ratings the rate is over."""
    thumbs_interval: list[float] | None = None
    """Always-valid 95% interval of the thumbs-up rate: [low, high]."""
    likert_mean: float | None = None
    likerts: int = 0
    completions: int = 0
    error_rate: float | None = None
    latency_p50_s: float | None = None
    mean_tokens: float | None = None
    evidence_at: float | None = None
    """When the rollout service took these figures (the latest event carrying them)."""


class DecisionView(BaseModel):
    sequence: int
    at: float
    version: str
    stage: str
    """candidate, canary, promoted, rolled_back, superseded; paused, resumed, mode."""
    reason: str
    stable: str
    canary: str
    canary_share: float
    verdicts: dict[str, str]
    """Per signal (thumbs, likert, side_by_side, no_error): the gate's verdict (promote, rollback, continue)."""
    thumbs_difference: list[float] | None = None
    """The always-valid interval of canary minus stable thumbs-up rate the verdict was taken on."""


class RoutedView(BaseModel):
    """This gateway replica's chat requests since the current canary started (or the last one ended)."""

    stable: int = 0
    canary: int = 0
    side_by_side: int = 0
    canary_fallback: int = 0


class FlywheelView(BaseModel):
    object: Literal["flywheel"] = "flywheel"
    following: bool
    """True once this gateway has read rlhf.rollout to its end and follows it."""
    canary_routing: bool
    """True when this gateway routes to a canary group (RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS)."""
    live_figures: bool = False
    """True when the versions' figures are the rollout service's live ones (RLHF_GATEWAY_ROLLOUT_ADDRESS),
    false when they come from the latest rollout event carrying them."""
    sequence: int
    updated_at: float | None
    stable: str
    canary: str
    queued: str
    canary_share: float
    paused: bool
    mode: str
    versions: list[VersionView]
    routed: RoutedView
    decisions: list[DecisionView]
    """The most recent rollout events, newest first (bounded: RLHF_GATEWAY_FLYWHEEL_EVENTS)."""
