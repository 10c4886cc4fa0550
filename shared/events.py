"""Payloads of the events on the loop's topics (see shared/kafka/topics.py for who writes them).

Each is a plain dataclass registered with a type name and schema version; shared/kafka/envelope.py
wraps it. Bump the schema version when a field changes meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.kafka.envelope import event


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Timings:
    queued_s: float
    """From the request's arrival to its admission into the engine (waiting behind a hot-swap)."""
    first_token_s: float
    """From arrival to the first generated token."""
    total_s: float
    """From arrival to the last token."""


@event("completion", 1)
@dataclass(frozen=True)
class CompletionEvent:
    """One completion served by the inference service (topic rlhf.completions, key request_id)."""

    request_id: str
    response_id: str
    index: int
    """Position among the n completions of the request."""
    n: int
    policy_version: str
    model: str
    source: str
    """"user" for chat traffic, "trainer" for PPO rollouts."""
    messages: list[Message]
    prompt_token_ids: list[int]
    completion_text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str
    sampling: dict
    """The sampling parameters actually used (temperature, top_p, top_k, max_tokens, seed, stop)."""
    timings: Timings
    created_at: float
    policy_versions: list[str] = field(default_factory=list)
    """Every version that produced tokens, in order; more than one only for a completion in flight
    during an "immediate" hot-swap (learners that need one version per sample skip those)."""
    principal: str = ""
    """Who asked, as the gateway established it (an API key's name or a session); empty for the
    trainer's rollouts. Never the client's own say-so."""
    conversation_id: str = ""
    """The conversation the request belongs to (sticky routing, per-conversation limits)."""


@event("policy-update", 1)
@dataclass(frozen=True)
class PolicyUpdateEvent:
    """A policy version was published and should be served (topic rlhf.policy-updates)."""

    version: str
    """The model store version to serve, e.g. "policy-0002" (read from the receiver's own store)."""
    manifest_sha256: str
    """sha256 of the version's manifest.json: the receiver checks it read the same manifest."""
    parent: str | None = None
    reason: str = "publish"
    """"publish" for a new version, "rollback" when an earlier version is made current again."""
    metrics: dict = field(default_factory=dict)
    sequence: int = 0
    """The publisher's announcement number on this line, strictly increasing (replays are refused)."""
    key_id: str = ""
    """Which signing key signed the announcement (shared/signing.py)."""
    signature: str = ""
    """Ed25519 signature (base64) of line, version, manifest_sha256, reason and sequence."""


@event("policy-candidate", 1)
@dataclass(frozen=True)
class PolicyCandidateEvent:
    """A gated policy version became the trainer's candidate for a canary (topic
    rlhf.policy-candidates, rollout on). The fields of PolicyUpdateEvent; its signature covers the
    line "policy.candidate", so it can never pass for a PolicyUpdateEvent."""

    version: str
    manifest_sha256: str
    parent: str | None = None
    reason: str = "publish"
    """"publish" for a new candidate, "rollback" when the trainer points the candidate back."""
    metrics: dict = field(default_factory=dict)
    sequence: int = 0
    """The trainer's announcement number on the candidate pointer, strictly increasing."""
    key_id: str = ""
    signature: str = ""
    """Ed25519 signature (base64) of line "policy.candidate", version, manifest_sha256, reason and sequence."""


@event("policy-canary", 1)
@dataclass(frozen=True)
class PolicyCanaryEvent:
    """The canary replicas should serve this version (topic rlhf.policy-canary; the rollout service
    announces it; the stable version again when a canary ends). Signed over line "policy.canary"."""

    version: str
    manifest_sha256: str
    parent: str | None = None
    reason: str = "publish"
    """"publish" for a newer version, "rollback" when the pointer goes back (a canary rolled back)."""
    metrics: dict = field(default_factory=dict)
    sequence: int = 0
    """The rollout service's announcement number on the canary pointer, strictly increasing."""
    key_id: str = ""
    signature: str = ""
    """Ed25519 signature (base64) of line "policy.canary", version, manifest_sha256, reason and sequence."""


@event("reward-model", 1)
@dataclass(frozen=True)
class RewardModelEvent:
    """A reward model version was published (topic rlhf.reward-models)."""

    version: str
    manifest_sha256: str
    parent: str | None = None
    metrics: dict = field(default_factory=dict)
    reason: str = "publish"
    """"publish" for a new version, "rollback" when an earlier version is made current again."""
    sequence: int = 0
    """The publisher's announcement number on this line, strictly increasing (replays are refused)."""
    key_id: str = ""
    """Which signing key signed the announcement (shared/signing.py)."""
    signature: str = ""
    """Ed25519 signature (base64) of line, version, manifest_sha256, reason and sequence."""


@dataclass(frozen=True)
class RatedResponse:
    """One response a rating is about, as the server vouches for it (from its signed token)."""

    response_id: str
    policy_version: str
    prompt_hash: str


@event("feedback", 1)
@dataclass(frozen=True)
class FeedbackEvent:
    """An accepted rating (topic rlhf.feedback, key user_id).

    ``user_id`` is the principal that rated, as the gateway authenticated it (an API key's name or a
    session), and every rated response was served to that principal (its signed token says so);
    the client's own ``user`` field is only the ``label``. A principal's later rating of the same
    target (same kind, same responses) supersedes the earlier one: it carries revision + 1 and
    ``supersedes`` = the earlier feedback_id. Readers keep only the highest revision per (user_id,
    target). ``feedback_id`` is derived from the principal and the idempotency key, so a record
    written twice (a retry after a lost acknowledgement) has one id.
    """

    feedback_id: str
    kind: str
    """"thumb", "likert", "pairwise" or "ranking"."""
    user_id: str
    """The principal that rated (never the client's say-so)."""
    target: str
    """Identity of what is rated: kind plus the sorted response ids."""
    revision: int
    supersedes: str | None
    responses: list[RatedResponse]
    """The rated responses in the rating's order: for a ranking best first, for pairwise (a, b)."""
    thumb: str | None = None
    """"up" or "down" (kind thumb)."""
    score: int | None = None
    """1 to 7 (kind likert)."""
    preferred: str | None = None
    """"a", "b" or "tie" (kind pairwise)."""
    ranks: list[int] | None = None
    """Kind ranking, when it has ties: the rank of each response in ``responses`` (1 = best, equal
    ranks equally good, non-decreasing). None: strictly best first."""
    comment: str = ""
    tags: list[str] = field(default_factory=list)
    idempotency_key: str = ""
    received_at: float = 0.0
    label: str = ""
    """The client's free-text ``user`` label, recorded under the principal; not an identity."""


@event("feedback-rejected", 1)
@dataclass(frozen=True)
class RejectedFeedbackEvent:
    """A refused rating and why (topic rlhf.feedback.dlq); never read by the learning services."""

    reason: str
    param: str | None
    raw: str
    """The submission as received (JSON text or the protobuf's text form), cut to 8 KiB."""
    source: str
    """"http" (refused by the gateway before parsing) or "grpc"."""
    received_at: float


@event("rollout", 1)
@dataclass(frozen=True)
class RolloutEvent:
    """A step of a policy version's rollout, with the routing it leaves behind (topic rlhf.rollout,
    key "policy"). Each event carries the whole resulting state, so a follower needs only the latest."""

    sequence: int
    """1, 2, 3, ... per rollout controller: the order of the decisions (a replay is never newer)."""
    version: str
    """The version this step is about."""
    stage: str
    """"candidate" (queued), "canary", "promoted", "rolled_back" or "superseded"; or "paused",
    "resumed", "mode" for operator steps that change no version."""
    reason: str
    stable: str
    """The version every user outside the canary gets, after this step."""
    canary: str
    """The version in canary after this step ("" when none)."""
    canary_share: float
    """Share of principals/conversations routed to the canary (0 when none)."""
    paused: bool
    """Decisions frozen by an operator: the canary keeps its traffic, nothing is promoted or rolled back."""
    mode: str
    """"auto" (the live gate decides) or "manual" (only an operator does)."""
    queued: str = ""
    """The next candidate waiting for the canary slot ("" when none)."""
    evidence: dict = field(default_factory=dict)
    """What the decision was taken on (per signal: counts, means, the always-valid interval)."""
    at: float = 0.0
