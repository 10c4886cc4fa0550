"""One sampled, scored response (a Rollout) and the collation of a batch of them into padded tensors.

    sequence   = prompt_token_ids + response_token_ids        (right-padded to the batch's longest)
    response   = cut after the first EOS (the EOS stays: ending the turn is an action the policy took)

Per-token tensors are *response-aligned*: column ``j`` is the ``j``-th response token. The causal
LM's output at sequence position ``prompt_len - 1 + j`` predicts that token, so
``response_positions[b, j]`` holds that index; the learner gathers hidden states there, which keeps
the unembedding off the prompt and makes every per-token quantity (logprobs, values, KL, rewards,
advantages) a (batch, response_len) tensor with one ``response_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from shared.errors import InvalidArgument
from shared.events import Message


class InvalidRollout(InvalidArgument, ValueError):
    """A rollout that cannot be trained on; the message names the rollout and the field."""


@dataclass
class Rollout:
    """A response sampled from the served policy for a prompt, with its reward model score."""

    messages: list[Message]
    """The conversation the response answers (what the reward model saw)."""
    prompt_token_ids: list[int]
    """The prompt as the policy read it (chat template with the generation prompt)."""
    response_token_ids: list[int]
    """The sampled tokens, ending with EOS unless the response was cut at the token limit."""
    behaviour_logprobs: list[float] | None
    """log pi_behaviour(token) of each response token, as reported by the sampler (vLLM), under the policy
    version that sampled it. Needed when that version is older than the learner's weights."""
    policy_version: str
    """The policy version that sampled the response (e.g. "policy-0003")."""
    finish_reason: str
    """"stop" (EOS or stop string) or "length" (cut at max tokens)."""
    score: float
    """The reward model's score of (messages, response)."""
    rm_version: str = ""
    """The reward model version that scored it."""
    extra: dict = field(default_factory=dict)
    """Free-form facts (response_id, prompt id, ...); the learner ignores them."""


@dataclass
class RolloutBatch:
    """Right-padded tensors of a list of rollouts (B samples, L sequence positions, R response tokens)."""

    input_ids: torch.Tensor
    """(B, L) long: prompt + response, then padding."""
    attention_mask: torch.Tensor
    """(B, L) long: 1 on prompt and response tokens."""
    response_ids: torch.Tensor
    """(B, R) long: the response tokens, padded."""
    response_positions: torch.Tensor
    """(B, R) long: sequence position whose output predicts each response token (prompt_len - 1 + j);
    padding columns repeat a valid position."""
    response_mask: torch.Tensor
    """(B, R) float: 1 on response tokens up to and including the first EOS."""
    scores: torch.Tensor
    """(B,) float: reward model scores."""
    behaviour_logprobs: torch.Tensor
    """(B, R) float: the sampler's logprobs (0 where a rollout had none or on padding)."""
    has_behaviour_logprobs: torch.Tensor
    """(B,) bool: whether the rollout carried behaviour logprobs."""
    ended_with_eos: torch.Tensor
    """(B,) bool: the response ends with EOS (False: cut at the length limit)."""

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: torch.Tensor | Sequence[int]) -> RolloutBatch:
        """The sub-batch of ``rows`` (padding kept as it is)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        return RolloutBatch(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})


def cut_at_eos(response_token_ids: Sequence[int], eos_token_id: int | None) -> list[int]:
    """The response up to and including its first EOS token."""
    ids = list(response_token_ids)
    if eos_token_id is not None and eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1]
    return ids


def collate_rollouts(rollouts: Sequence[Rollout], pad_token_id: int, eos_token_id: int | None) -> RolloutBatch:
    """Pad ``rollouts`` into a RolloutBatch (see the module docstring); raises InvalidRollout."""
    if not rollouts:
        raise InvalidRollout("no rollouts to collate")
    prompts, responses, behaviour = [], [], []
    for i, r in enumerate(rollouts):
        if not r.prompt_token_ids:
            raise InvalidRollout(f"rollout {i}: prompt_token_ids is empty")
        response = cut_at_eos(r.response_token_ids, eos_token_id)
        if not response:
            raise InvalidRollout(f"rollout {i}: response_token_ids is empty")
        if r.behaviour_logprobs is not None and len(r.behaviour_logprobs) < len(response):
            raise InvalidRollout(
                f"rollout {i}: behaviour_logprobs has {len(r.behaviour_logprobs)} values for "
                f"{len(response)} response tokens"
            )
        if not isinstance(r.score, (int, float)) or r.score != r.score or abs(r.score) == float("inf"):
            raise InvalidRollout(f"rollout {i}: score {r.score!r} is not a finite number")
        prompts.append(list(r.prompt_token_ids))
        responses.append(response)
        behaviour.append(None if r.behaviour_logprobs is None else list(r.behaviour_logprobs[: len(response)]))

    batch = len(rollouts)
    seq_len = max(len(p) + len(r) for p, r in zip(prompts, responses))
    resp_len = max(len(r) for r in responses)
    input_ids = torch.full((batch, seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq_len), dtype=torch.long)
    response_ids = torch.full((batch, resp_len), pad_token_id, dtype=torch.long)
    response_positions = torch.zeros((batch, resp_len), dtype=torch.long)
    response_mask = torch.zeros((batch, resp_len), dtype=torch.float32)
    behaviour_logprobs = torch.zeros((batch, resp_len), dtype=torch.float32)
    for b, (prompt, response, logprobs) in enumerate(zip(prompts, responses, behaviour)):
        n_prompt, n_resp = len(prompt), len(response)
        input_ids[b, : n_prompt + n_resp] = torch.tensor(prompt + response)
        attention_mask[b, : n_prompt + n_resp] = 1
        response_ids[b, :n_resp] = torch.tensor(response)
        positions = torch.arange(n_prompt - 1, n_prompt - 1 + resp_len)
        response_positions[b] = positions.clamp(max=n_prompt + n_resp - 2)
        response_mask[b, :n_resp] = 1.0
        if logprobs is not None:
            behaviour_logprobs[b, :n_resp] = torch.tensor(logprobs, dtype=torch.float32)
    ended = torch.tensor([eos_token_id is not None and r[-1] == eos_token_id for r in responses])
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_ids=response_ids,
        response_positions=response_positions,
        response_mask=response_mask,
        scores=torch.tensor([float(r.score) for r in rollouts], dtype=torch.float32),
        behaviour_logprobs=behaviour_logprobs,
        has_behaviour_logprobs=torch.tensor([lp is not None for lp in behaviour]),
        ended_with_eos=ended,
    )
