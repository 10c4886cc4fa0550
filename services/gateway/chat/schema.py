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
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)

CONVERSATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
MAX_TOP_LOGPROBS = 20
"""OpenAI's upper bound on top_logprobs."""


def unicode_text(value: str) -> str:
    """``value`` when it is valid Unicode text; raises ValueError for one with a lone surrogate
    (JSON can spell one, ``"\\ud800"``; UTF-8, protobuf and the JSON answer cannot carry it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it has a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(unicode_text)]
"""A string field that reaches a gRPC message or an answer: valid Unicode only."""


def in_range(value: int | None, high: int) -> int | None:
    """``value`` when None or 0 <= value <= high (the range of the gRPC field it goes into: uint32 or
    uint64); raises ValueError naming the range otherwise (pydantic reports it as a 400 naming the
    field)."""
    if value is not None and not 0 <= value <= high:
        raise ValueError(f"must be an integer from 0 to {high}")
    return value


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def canonical_role(self) -> str:
        # OpenAI's newer "developer" role plays the part of "system".
        return "system" if self.role == "developer" else self.role


class StreamOptions(_Request):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Request):
    model: Text
    messages: list[ChatMessageIn] = Field(min_length=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    n: StrictInt | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    stop: Text | list[Text] | None = None
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
        in_range(v, MAX_TOP_LOGPROBS)
        if v:
            raise ValueError(
                "this server returns the sampled token's logprob only (logprobs: true), not the most likely "
                "alternatives: top_logprobs must be 0 or unset"
            )
        return v

    @field_validator("n", "max_tokens", "max_completion_tokens", "top_k")
    @classmethod
    def _uint32(cls, v: int | None) -> int | None:
        return in_range(v, UINT32_MAX)

    @field_validator("seed")
    @classmethod
    def _uint64(cls, v: int | None) -> int | None:
        return in_range(v, UINT64_MAX)

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


# --- POST /v1/completions (the legacy API) -------------------------------------------------------


class CompletionRequest(_Request):
    """The legacy completions API, served as a chat completion of one user message: ``prompt``
    (one string, or a list of exactly one) becomes that message, so the served policy answers it
    with its chat template, as it answers every user. Fields of the legacy API this server cannot
    honour (echo, suffix, best_of other than n, logprobs above 0, stream) are refused by name rather
    than ignored."""

    model: Text
    prompt: Text | list[Text]
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: StrictInt | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    logprobs: StrictInt | None = None
    """Legacy meaning: the number of most likely alternatives per token; 0 gives the sampled tokens'
    logprobs (all this server computes), more is refused."""
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None
    user: str | None = None
    conversation_id: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("this server completes one prompt per request: a string, or a list of one")
        return v

    @field_validator("n", "max_tokens")
    @classmethod
    def _uint32(cls, v: int | None) -> int | None:
        return in_range(v, UINT32_MAX)

    @field_validator("seed")
    @classmethod
    def _uint64(cls, v: int | None) -> int | None:
        return in_range(v, UINT64_MAX)

    @field_validator("logprobs")
    @classmethod
    def _sampled_only(cls, v: int | None) -> int | None:
        if v is not None and v != 0:
            raise ValueError("this server returns the sampled tokens' logprobs only: logprobs must be 0 or unset")
        return v

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool) -> bool:
        if v:
            raise ValueError("streaming is served on /v1/chat/completions (stream: true), not on the legacy API")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported: the prompt is answered as a chat message, not continued")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v not in (1, info.data.get("n") or 1):
            raise ValueError("best_of must equal n (this server returns every completion it samples)")
        return v

    @field_validator("conversation_id")
    @classmethod
    def _conversation_id(cls, v: str | None) -> str | None:
        if v is not None and not CONVERSATION_ID.fullmatch(v):
            raise ValueError("must be 1 to 128 letters, digits, '.', '_', ':' or '-'")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def as_chat(self) -> ChatCompletionRequest:
        """The chat completion this request is served as (its fields were checked as a chat
        completion's are)."""
        return ChatCompletionRequest(
            model=self.model,
            messages=[ChatMessageIn(role="user", content=self.prompt_text())],
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            n=self.n,
            stop=self.stop,
            seed=self.seed,
            logprobs=self.logprobs is not None,
            user=self.user,
            conversation_id=self.conversation_id,
        )


class CompletionLogprobs(BaseModel):
    """The legacy logprobs shape: one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None
    response_id: str
    """Id of this completion: rate it through the feedback endpoint."""
    feedback_token: str | None = None
    policy_version: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    policy_version: str
    response_id: str


def as_completion(chat: ChatCompletionResponse) -> CompletionResponse:
    """A chat completion's response in the legacy completions shape (same ids, versions, tokens)."""
    choices = []
    for c in chat.choices:
        logprobs = None
        if c.logprobs is not None:
            offsets, at = [], 0
            for t in c.logprobs.content:
                offsets.append(at)
                at += len(t.token)
            logprobs = CompletionLogprobs(
                tokens=[t.token for t in c.logprobs.content],
                token_logprobs=[t.logprob for t in c.logprobs.content],
                text_offset=offsets,
            )
        choices.append(
            CompletionChoice(
                index=c.index,
                text=c.message.content,
                finish_reason=c.finish_reason,
                logprobs=logprobs,
                response_id=c.response_id,
                feedback_token=c.feedback_token,
                policy_version=c.policy_version,
            )
        )
    return CompletionResponse(
        id="cmpl-" + chat.id.removeprefix("chatcmpl-"),
        created=chat.created,
        model=chat.model,
        choices=choices,
        usage=chat.usage,
        policy_version=chat.policy_version,
        response_id=chat.response_id,
    )


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
