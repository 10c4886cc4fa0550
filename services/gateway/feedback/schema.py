"""The POST /v1/feedback schema (pydantic models): one rating in, the stored rating's id out.

Only the shape is checked against it; the feedback service judges the values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: one rating. Which fields apply depends on ``type``:

    - thumb: ``response_id``, ``thumb`` ("up" | "down")
    - likert: ``response_id``, ``score`` (1-7)
    - pairwise: ``response_ids`` [a, b], ``preferred`` ("a" | "b" | "tie")
    - ranking: ``response_ids`` (2-9, best first), optionally ``ranks`` for ties: the rank of each
      (1 = best, equal ranks equally good, non-decreasing), e.g. [1, 2, 2]

    Always ``feedback_tokens`` (the token of every rated response, as served to the caller: a
    response can be rated only by the principal it was served to); optionally ``user`` (a free-text
    label recorded with the rating, at most 128 characters; the voter is the authenticated
    principal, never this), ``comment``, ``tags`` and ``idempotency_key`` (or the Idempotency-Key
    header). Values are checked by the feedback service; here only the shape.
    """

    model_config = ConfigDict(extra="forbid")

    type: str
    feedback_tokens: list[str]
    user: str = ""
    response_id: str | None = None
    response_ids: list[str] | None = None
    thumb: str | None = None
    score: StrictInt | None = None
    preferred: str | None = None
    ranks: list[StrictInt] | None = None
    comment: str = ""
    tags: list[str] = Field(default_factory=list)
    idempotency_key: str = ""


class FeedbackResponse(BaseModel):
    object: Literal["feedback"] = "feedback"
    feedback_id: str
    revision: int
    duplicate: bool
    """True when nothing new was stored (a retry, or the same vote again)."""
