"""Domain objects of the reward service, independent of gRPC and of torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.events import Message

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ScoreItem:
    """One (conversation, response) pair to score; the response is the assistant's next turn."""

    messages: list[Message]
    response: str


@dataclass(frozen=True)
class ScoreResult:
    scores: list[float]
    """One reward per item, in request order."""
    rm_version: str
    """The reward model version that produced every score of the request."""
    truncated: list[bool]
    """Per item: was its prompt or response cut to the limits."""


@dataclass(frozen=True)
class RewardModelInfo:
    version: str
    parent: str | None
    published_at: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RaterRecord:
    """One principal as the retraining loop judges it (services/reward/raters.py)."""

    principal: str
    status: str
    """"ok", "quarantined" or "released"."""
    reason: str
    """Why it was quarantined (or that an operator released it); empty while ok."""
    peer_agreement: float
    """Agreement with other raters on overlapping items; NaN without overlap."""
    peer_items: int
    rm_agreement: float
    """Share of its scored pairs the reward model ordered its way; NaN when none was scored."""
    rm_items: int
    comparisons: int
    """Its live comparisons when last judged."""
    updated_at: float
    """When its scores were last computed (Unix time)."""
    status_at: float
    """When it was quarantined or released; 0 while ok."""


@dataclass(frozen=True)
class RaterList:
    raters: list[RaterRecord]
    total: int
    """Principals the retraining loop has judged."""
    quarantined: int
    """Of them, quarantined now."""
    held_back: dict[str, int]
    """Comparisons the last round left out, by reason: capped, quarantined (and heldout_capped,
    heldout_quarantined for the held-out slice)."""
