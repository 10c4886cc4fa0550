"""Domain objects of the feedback service, independent of gRPC and Kafka."""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("thumb", "likert", "pairwise", "ranking")
TAGS = ("hallucination", "harmful", "ignores_instruction", "wrong_language", "unhelpful", "inappropriate")
THUMBS = ("up", "down")
PREFERENCES = ("a", "b", "tie")
MIN_RANKED, MAX_RANKED = 2, 9
MAX_TAGS = len(TAGS)
MAX_ID_CHARS = 128


@dataclass(frozen=True)
class Submission:
    """One rating as a client submitted it, before any check."""

    kind: str
    response_ids: list[str]
    """The rated responses in the rating's order (ranking: best first; pairwise: a, b)."""
    feedback_tokens: list[str]
    principal: str
    """Who is rating, as the gateway authenticated them; every token must have been issued to it."""
    label: str = ""
    """The client's free-text ``user`` field, recorded with the rating; never the voter."""
    thumb: str | None = None
    score: int | None = None
    preferred: str | None = None
    ranks: list[int] | None = None
    """Ranking with ties: the rank of each response (1 = best; equal = tie). None: strictly best first."""
    comment: str = ""
    tags: list[str] = field(default_factory=list)
    idempotency_key: str = ""

    @property
    def target(self) -> str:
        """What is being rated, independent of the verdict: a newer vote on it supersedes."""
        return f"{self.kind}:{','.join(sorted(self.response_ids))}"


@dataclass(frozen=True, slots=True)
class SubmitResult:
    feedback_id: str
    revision: int
    duplicate: bool
