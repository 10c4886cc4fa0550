"""The three networks PPO trains with, loaded from model-store version directories (safetensors only).

    policy     the causal LM being trained (transformers AutoModelForCausalLM), float32
    reference  a frozen copy of the SFT policy: the per-token KL penalty is measured against it
    value      InstructGPT's value function: the reward model (backbone + scalar head, see
               shared/models/reward_model.py) read at every token instead of the last one only

``PolicyHead`` and ``ValueHead`` are the nn.Modules the learner calls (and wraps in
DistributedDataParallel): one forward pass returns response-aligned per-token quantities (see
rollout_batch.py), computing the unembedding only where a response token is predicted.

Loading goes through shared/models/loading.py: a store version is verified (every file's sha256)
before it is read, and weights come from safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from shared.model_store import PICKLE_SUFFIXES
from shared.models.loading import load_causal_lm
from shared.models.reward_model import RewardModel

from .ppo import logprobs_from_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class PolicyHead(nn.Module):
    """A causal LM returning, per response token, its log-probability and the entropy of the distribution.

    Logits are ``lm_head(decoder(x).last_hidden_state)`` (Llama-style causal LMs: the decoder and
    the output embedding are what ``get_decoder()`` / ``get_output_embeddings()`` return), divided
    by the sampling temperature.
    """

    def __init__(self, causal_lm: PreTrainedModel, temperature: float = 1.0):
        super().__init__()
        self.lm = causal_lm
        self.temperature = float(temperature)

    def response_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """(B, R, V) logits at ``positions`` (B, R) of the sequences, temperature applied."""
        hidden = self.lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        gathered = torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.lm.get_output_embeddings()(gathered) / self.temperature

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        labels: torch.Tensor,
        ptx_ids: torch.Tensor | None = None,
        ptx_mask: torch.Tensor | None = None,
        entropy_grad: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns ``(logprobs, entropy, ptx_nll)``: (B, R), (B, R), and when ``ptx_ids`` (P, T) is given
        the next-token negative log-likelihood (P, T - 1) of that text (at temperature 1).

        ``entropy_grad=False`` computes the entropy without a graph (a diagnostic when there is no
        entropy bonus). The pretraining pass lives in the same forward so that a data-parallel
        wrapper sees one forward per backward.
        """
        logits = self.response_logits(input_ids, attention_mask, positions)
        logp = torch.log_softmax(logits.float(), dim=-1)
        logprobs = torch.gather(logp, -1, labels.long().unsqueeze(-1)).squeeze(-1)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = -(logp.exp() * logp).sum(-1)
        ptx_nll = None
        if ptx_ids is not None:
            ptx_logits = self.lm(input_ids=ptx_ids, attention_mask=ptx_mask, use_cache=False).logits
            ptx_nll = -logprobs_from_logits(ptx_logits[:, :-1], ptx_ids[:, 1:])
        return logprobs, entropy, ptx_nll


class ValueHead(nn.Module):
    """The value function: a reward model's backbone and scalar head applied at every position.

    ``V(state before response token j) = score_head(h[prompt_len - 1 + j]) - offset``: the same
    hidden state that predicts token j, and the RM's own normalisation offset, so that at
    initialisation the value of the final state is the RM's reward for the sequence so far.
    """

    def __init__(self, reward_model: RewardModel):
        super().__init__()
        self.backbone = reward_model.backbone
        self.score_head = reward_model.score_head
        self.register_buffer("offset", reward_model.offset.detach().clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, R) values at ``positions`` (B, R)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        gathered = torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.score_head(gathered).squeeze(-1) - self.offset


# --- loading ----------------------------------------------------------------------------------


def load_policy(model_dir: Path) -> PreTrainedModel:
    """The causal LM in ``model_dir`` in float32 for training (safetensors only, no KV cache)."""
    model = load_causal_lm(model_dir, dtype=torch.float32, train=True, quiet=True)
    model.config.use_cache = False
    return model


def load_reference(model_dir: Path) -> PreTrainedModel:
    """A frozen copy of the causal LM in ``model_dir`` (eval mode, no gradients)."""
    model = load_policy(model_dir).eval()
    model.requires_grad_(False)
    return model


Module = TypeVar("Module", bound=nn.Module)


def frozen_copy(model: Module) -> Module:
    """A frozen deep copy (the reference when it is the same version as the initial policy)."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def load_value_model(rm_dir: Path) -> ValueHead:
    """A value function initialised from the reward model in ``rm_dir`` (shared/models/reward_model.py format)."""
    return ValueHead(RewardModel.load(rm_dir)).train()


# --- saving -----------------------------------------------------------------------------------


def save_policy(policy: PreTrainedModel, tokenizer: Any, out_dir: Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``policy`` as a Hugging Face directory (config.json, generation config, tokenizer,
    safetensors) that the inference service can hot-swap in place of the policy it was loaded from.

    ``dtype``: cast the weights to it (the dtype of the published policy, see
    shared/models/loading.py's ``weights_dtype``), so the tensor names, shapes and dtypes match
    what services/inference/weights.py checks.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = policy
    if dtype is not None and next(policy.parameters()).dtype != dtype:
        # transformers wraps PreTrainedModel.to in functools.wraps, which mypy types as unbound.
        model = copy.deepcopy(policy).to(dtype)  # type: ignore[arg-type]
    model.save_pretrained(out_dir)  # safetensors (the only format of transformers 5)
    tokenizer.save_pretrained(out_dir)
    pickled = [p.name for p in out_dir.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise RuntimeError(f"save_pretrained wrote pickle files {pickled}; the model store would refuse them")
    return out_dir
