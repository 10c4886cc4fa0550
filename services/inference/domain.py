"""Domain objects of the inference service, independent of gRPC and of vLLM."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.events import Message

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k cut."""
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[Message]
    sampling: Sampling
    source: str = "user"
    principal: str = ""
    """Who asked, as the gateway authenticated them; empty for the trainer's rollouts."""
    conversation_id: str = ""
    """The conversation the request belongs to, when the client named one."""
    policy_version: str = ""
    """The version to answer with, when the caller names one (an adapter version this replica holds:
    the served one, or the canary beside it); empty: the version this replica serves."""


@dataclass
class CompletionResult:
    response_id: str
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str = ""
    first_token_at: float | None = None


@dataclass
class GenerationResult:
    request_id: str
    policy_version: str
    model: str
    prompt_token_ids: list[int]
    completions: list[CompletionResult]
    policy_versions: list[str] = field(default_factory=list)
    """Every version that produced tokens (one, unless an immediate swap happened meanwhile)."""

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)


@dataclass(frozen=True)
class Delta:
    """New output of one completion since its previous delta (streaming)."""

    index: int
    response_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str
    """Empty until the completion's last delta."""


@dataclass(frozen=True)
class PolicyStatus:
    policy_version: str
    model: str
    serving_since: float
    max_model_len: int
    swaps: int
    refused_updates: int
