"""How a (conversation, response) pair becomes the token sequence the reward model reads.

Training and scoring use this one function, so the RM is always scored on exactly the kind of
sequence it was trained on:

    prompt   = chat template over the messages, with the assistant generation prompt
               (default policy: <|bos|><|user|>\\n...<|end|>\\n<|assistant|>\\n)
    response = the response text as plain text (special-token strings in it are not special),
               followed by the tokenizer's EOS token (default policy: <|end|>), the token the
               policy ends an assistant turn with
    sequence = prompt + response; the reward is read at its last token (see model.py)

Truncation (the rule stated in protos/rlhf/v1/reward.proto):

1. The response keeps its first ``max_response_tokens - 1`` tokens, then the EOS token; so a long
   response is cut at its end and still ends with EOS, where the reward is read.
2. The prompt gets the remaining ``max_tokens - len(response)`` tokens. A longer prompt keeps its
   first token when that is BOS (every training sequence starts with it) and then its *last*
   tokens: the oldest turns are dropped, the latest turns and the assistant marker survive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from shared.events import Message

if TYPE_CHECKING:  # torch is imported by the one function that needs it
    import torch


@dataclass(frozen=True)
class EncodingLimits:
    max_tokens: int = 512
    """Longest sequence (prompt + response) the RM reads, in tokens."""
    max_response_tokens: int = 256
    """Longest response part (EOS included), in tokens; must leave room for a prompt."""

    def __post_init__(self) -> None:
        if not 2 <= self.max_response_tokens < self.max_tokens:
            raise ValueError(
                f"need 2 <= max_response_tokens ({self.max_response_tokens}) < max_tokens ({self.max_tokens})"
            )


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    prompt_tokens: int
    """How many of input_ids belong to the prompt (after truncation)."""
    truncated: bool
    """True when the prompt or the response was cut."""


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Prompt token ids: the tokenizer's chat template with the generation prompt.

    A tokenizer without a chat template (a plain base model as backbone) gets a minimal fallback:
    ``role: content`` lines, then ``assistant:``.
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [asdict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)
    text = "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant: "
    return list(tokenizer.encode(text, add_special_tokens=True))


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Response token ids, EOS appended; strings like "<|end|>" in the text stay plain text."""
    ids = list(tokenizer.encode(response, add_special_tokens=False, split_special_tokens=True))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def truncate(
    prompt_ids: list[int],
    response_ids: list[int],
    limits: EncodingLimits,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Encoded:
    """Apply the truncation rule of this module's docstring to already tokenized parts."""
    truncated = False
    if len(response_ids) > limits.max_response_tokens:
        truncated = True
        if eos_token_id is not None and response_ids and response_ids[-1] == eos_token_id:
            response_ids = response_ids[: limits.max_response_tokens - 1] + [eos_token_id]
        else:
            response_ids = response_ids[: limits.max_response_tokens]
    budget = limits.max_tokens - len(response_ids)
    if len(prompt_ids) > budget:
        truncated = True
        keep_bos = bos_token_id is not None and prompt_ids and prompt_ids[0] == bos_token_id
        if keep_bos:
            prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - (budget - 1) :]
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - budget :]
    return Encoded(list(prompt_ids) + list(response_ids), len(prompt_ids), truncated)


def encode_rm_input(tokenizer: Any, messages: Sequence[Message], response: str, limits: EncodingLimits) -> Encoded:
    """The RM's input for one (conversation, response) pair, truncated to ``limits``."""
    return truncate(
        render_prompt(tokenizer, messages),
        encode_response(tokenizer, response),
        limits,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def pad_batch(sequences: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` tensors (batch, longest)."""
    import torch

    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
