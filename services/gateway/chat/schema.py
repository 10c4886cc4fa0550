"""OpenAI chat-completions and models schema as the gateway accepts and returns it (pydantic models).

Requests: the fields the OpenAI Python client sends. Known fields are type-checked; unknown fields
are ignored, as OpenAI-compatible servers do, so newer clients keep working. Limits (n, max_tokens,
context length) are checked by the inference service, the one authority on them.

Responses follow OpenAI's shape plus RLHF Flywheel's fields: every choice carries the
``response_id`` to rate it by and the ``policy_version`` that wrote it, and the response carries the
``policy_version`` that produced it (side by side, the two choices come from two versions).
"""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

CONVERSATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def canonical_role(self) -> str:
        # OpenAI's newer "developer" role plays the part of "system".
        return "system" if self.role == "developer" else self.role


class StreamOptions(_Request):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Request):
    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    n: StrictInt | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    user: str | None = None
    """The client's own label for its end user; recorded nowhere as an identity (the principal is
    the gateway's, from the key or session)."""
    conversation_id: str | None = None
    """RLHF Flywheel's extension: the conversation this request belongs to (1-128 characters:
    letters, digits, ``.``, ``_``, ``:``, ``-``), recorded with the completion and in its feedback
    token. OpenAI clients send it with ``extra_body``."""

    @field_validator("conversation_id")
    @classmethod
    def _conversation_id(cls, v: str | None) -> str | None:
        if v is not None and not CONVERSATION_ID.fullmatch(v):
            raise ValueError("must be 1 to 128 letters, digits, '.', '_', ':' or '-'")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _only_sampled_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError("only the sampled token's logprob is returned: top_logprobs must be 0 or unset")
        return v

    @field_validator("seed", "n", "max_tokens", "max_completion_tokens", "top_k")
    @classmethod
    def _non_negative(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError("must not be negative")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# --- responses -----------------------------------------------------------------------------------


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None
    response_id: str
    """Id of this completion: rate it through the feedback endpoint."""
    feedback_token: str | None = None
    """Signed proof that this response was served; send it with a rating of it."""
    policy_version: str | None = None
    """The policy version that wrote this choice (side by side, the two choices differ)."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    policy_version: str
    """The policy version whose weights produced the choices (side by side: the first choice's;
    each choice says its own)."""
    response_id: str
    """The first choice's response_id (the only one when n = 1)."""


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None
    response_id: str
    feedback_token: str | None = None
    """On each choice's first chunk."""
    policy_version: str | None = None
    """On each choice's first chunk: the version that writes it."""


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    policy_version: str


# --- GET /v1/models ------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlhf-flywheel"
    policy_version: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
