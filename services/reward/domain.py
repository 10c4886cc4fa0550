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
