"""Server-sent events of a streamed chat completion, encoded without pydantic on the per-token path.

Most events of a stream are plain text deltas: a choice's continuation, with no role, feedback
token or logprobs. ``DeltaEvents.delta`` writes them from a head and a tail encoded once per stream
(and per policy version, side by side), with only the text, the finish reason and the response id
encoded per event: the same bytes as ``ChatCompletionChunk(...).model_dump_json(exclude_none=True)``
(tests/unit/services/gateway/chat/test_sse.py checks it) for a fraction of the CPU. Every other
event (a choice's first, logprobs, usage) goes through the pydantic models (``sse``).
"""

from __future__ import annotations

import json

from services.gateway.chat.schema import ChatCompletionChunk

json_str = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
"""A str as a JSON string, as pydantic writes it: UTF-8 kept, quotes, backslashes and control
characters escaped (C encoder)."""

MAX_HEADS = 8
"""(model, policy_version) heads kept per stream; a stream has one, or two side by side."""


def sse(chunk: ChatCompletionChunk) -> str:
    """One event carrying ``chunk`` (the general path)."""
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


class DeltaEvents:
    """The text-delta events of one stream (one ``id`` and ``created``)."""

    def __init__(self, chat_id: str, created: int):
        self.chat_id = chat_id
        self.created = created
        self._heads: dict[tuple[str, str], tuple[str, str]] = {}

    def _head(self, model: str, policy_version: str) -> tuple[str, str]:
        key = (model, policy_version)
        parts = self._heads.get(key)
        if parts is None:
            head = (
                f'data: {{"id":{json_str(self.chat_id)},"object":"chat.completion.chunk",'
                f'"created":{self.created},"model":{json_str(model)},"choices":[{{"index":'
            )
            tail = f'}}],"policy_version":{json_str(policy_version)}}}\n\n'
            parts = (head, tail)
            if len(self._heads) < MAX_HEADS:
                self._heads[key] = parts
        return parts

    def delta(
        self, model: str, policy_version: str, index: int, text: str, finish_reason: str, response_id: str
    ) -> str:
        """The event of a continuation delta: ``text`` (and ``finish_reason`` when set) of choice
        ``index``; equal to ``sse`` of the ChatCompletionChunk with that one ChunkChoice."""
        head, tail = self._head(model, policy_version)
        finish = f',"finish_reason":{json_str(finish_reason)}' if finish_reason else ""
        return (
            f'{head}{index},"delta":{{"content":{json_str(text)}}}{finish},"response_id":{json_str(response_id)}{tail}'
        )
