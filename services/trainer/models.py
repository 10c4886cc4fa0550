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

**LoRA** (``ModelSettings.policy_mode = "lora"``, PEFT): the policy is the base causal LM with LoRA
adapters on ``target_modules`` (only the adapters train), and the reference is *the same modules
with the adapter switched off* (``PolicyHead(..., adapter_off=peft_model.disable_adapter)``): no
second copy of the weights. The value function is either the reward model as above
(``value_model = "reward_model"``) or ``PolicyValueHead``, a linear head on the policy's own hidden
states (``"policy_head"``): no third copy either. ``save_adapter`` writes the adapter version's files
(shared/models/adapters.py: PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from shared.model_store import PICKLE_SUFFIXES
from shared.models.adapters import ADAPTER_CONFIG, ADAPTER_FILES, AdapterInfo, parse_adapter_extra
from shared.models.loading import PRECISIONS, autocast_dtype, device_problems, load_causal_lm
from shared.models.reward_model import RewardModel
from shared.models.safetensors_io import write_safetensors

from .ppo import logprobs_from_logits

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

POLICY_MODES = ("full", "lora")
"""``full``: every weight of the policy trains; ``lora``: LoRA adapters on a frozen base (PEFT)."""
VALUE_MODELS = ("reward_model", "policy_head")
"""``reward_model``: the value function is a copy of the RM (InstructGPT); ``policy_head``: a linear
head on the policy's own hidden states (``PolicyValueHead``)."""
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Llama/Qwen2 block: the modules vLLM's LoRA kernels serve."""


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter's shape (PEFT's LoraConfig): ``W x + (alpha / rank) B A x``, B (out x rank)
    zero at initialisation (so the adapted model starts as the base), A (rank x in) random."""

    rank: int = 8
    """LoRA rank r (at least 1; vLLM's ``max_lora_rank`` must be at least this to serve it)."""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training, in [0, 1)."""
    target_modules: tuple[str, ...] = LLAMA_LORA_TARGETS
    """Names of the linear modules that get an adapter."""

    def problems(self) -> list[str]:
        out = []
        if self.rank < 1:
            out.append(f"LoRA rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            out.append(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(m and m.isidentifier() for m in self.target_modules):
            out.append(f"LoRA target modules must be non-empty module names, got {list(self.target_modules)}")
        return out


@dataclass(frozen=True)
class ModelSettings:
    """How the learner holds its networks: what trains, where, in what precision (TrainerConfig's
    policy_mode, lora_*, value_model, device, precision, gradient_checkpointing)."""

    policy_mode: str = "full"
    """One of POLICY_MODES."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The adapter of a new LoRA policy (an adapter version being trained on keeps its own shape)."""
    value_model: str = "reward_model"
    """One of VALUE_MODELS."""
    device: str = "cpu"
    """torch device of the learner: ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: str = "auto"
    """One of PRECISIONS."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them (less
    memory, about a third more compute)."""

    @property
    def lora_enabled(self) -> bool:
        return self.policy_mode == "lora"

    def problems(self) -> list[str]:
        out = []
        if self.policy_mode not in POLICY_MODES:
            out.append(f"policy mode {self.policy_mode!r} is not one of {', '.join(POLICY_MODES)}")
        if self.value_model not in VALUE_MODELS:
            out.append(f"value model {self.value_model!r} is not one of {', '.join(VALUE_MODELS)}")
        if self.precision not in PRECISIONS:
            out.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        out += device_problems(self.device)
        if self.lora_enabled:
            out += self.lora.problems()
        return out

    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the forward passes (None: plain float32); see ``autocast_dtype``."""
        return autocast_dtype(self.precision, torch.device(self.device).type)


class PolicyHead(nn.Module):
    """A causal LM returning, per response token, its log-probability and the entropy of the distribution.

    Logits are ``lm_head(decoder(x).last_hidden_state)`` (Llama-style causal LMs: the decoder and
    the output embedding are what ``get_decoder()`` / ``get_output_embeddings()`` return), divided
    by the sampling temperature.
    """

    def __init__(
        self,
        causal_lm: PreTrainedModel,
        temperature: float = 1.0,
        adapter_off: Callable[[], AbstractContextManager[Any]] | None = None,
    ):
        """``adapter_off``: a context manager factory (PEFT's ``disable_adapter``) every pass runs
        inside: the reference of a LoRA policy is the policy's own modules with the adapter off."""
        super().__init__()
        self.lm = causal_lm
        self.temperature = float(temperature)
        self._adapter_off = adapter_off

    def _mode(self) -> AbstractContextManager[Any]:
        return self._adapter_off() if self._adapter_off is not None else nullcontext()

    def response_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """(B, R, V) logits at ``positions`` (B, R) of the sequences, temperature applied."""
        with self._mode():
            return self._response_logits(input_ids, attention_mask, positions)

    def _response_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
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
        with self._mode():
            logits = self._response_logits(input_ids, attention_mask, positions)
            logp = torch.log_softmax(logits.float(), dim=-1)
            logprobs = torch.gather(logp, -1, labels.long().unsqueeze(-1)).squeeze(-1)
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                entropy = -(logp.exp() * logp).sum(-1)
            ptx_nll = None
            if ptx_ids is not None:
                ptx_logits = self.lm(input_ids=ptx_ids, attention_mask=ptx_mask, use_cache=False).logits
                ptx_nll = -logprobs_from_logits(ptx_logits[:, :-1].float(), ptx_ids[:, 1:])
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
        return self.score_head(gathered).squeeze(-1).float() - self.offset


class PolicyValueHead(nn.Module):
    """The value function as a linear head on the policy's own hidden states (adapter on):

        V(state before response token j) = w . stopgrad(h_policy[prompt_len - 1 + j]) + b

    The features are detached (the value loss does not move the policy) and computed without a
    graph; only ``head`` trains. No copy of any weights: the policy is held by reference, not as a
    submodule (so neither the value optimiser nor a data-parallel wrapper sees its parameters).
    ``head`` starts at zero: every value is 0 until it learns.
    """

    def __init__(self, causal_lm: PreTrainedModel, hidden_size: int):
        super().__init__()
        self._lm = (causal_lm,)  # a tuple: not registered as a submodule
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, R) values at ``positions`` (B, R)."""
        with torch.no_grad():
            hidden = (
                self._lm[0]
                .get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                .last_hidden_state
            )
            gathered = torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.head(gathered.to(self.head.weight.dtype)).squeeze(-1).float()


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


def attach_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """``model`` with a fresh LoRA adapter (PEFT): base weights frozen, B = 0 so the outputs are
    unchanged until the first update. ValueError when a target module is not in the model."""
    from peft import LoraConfig, get_peft_model

    # PEFT annotates lora_alpha as int; a float alpha (scaling alpha / r) is what it computes with.
    options: dict[str, Any] = {"r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout}
    config = LoraConfig(**options, target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_adapter(model: PreTrainedModel, adapter_dir: Path, *, trainable: bool) -> PeftModel:
    """``model`` with the PEFT adapter saved in ``adapter_dir`` (safetensors only; a directory of a
    store version is verified by the caller first)."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise ValueError(f"{adapter_dir}: no adapter_model.safetensors")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def merge_adapter(model: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """``model`` with the adapter in ``adapter_dir`` merged into its weights (a plain causal LM again)."""
    merged: PreTrainedModel = load_adapter(model, adapter_dir, trainable=False).merge_and_unload()
    merged.requires_grad_(True)
    return merged


def lora_info(peft_model: PeftModel, base_version: str) -> AdapterInfo:
    """The manifest's adapter description (shared/models/adapters.py) of ``peft_model``'s adapter."""
    from peft import LoraConfig

    config = peft_model.peft_config["default"]
    if not isinstance(config, LoraConfig):
        raise ValueError(f"the policy's adapter is {type(config).__name__}, not LoRA")
    modules = config.target_modules
    names = [modules] if isinstance(modules, str) else sorted(modules or ())
    return parse_adapter_extra(
        {
            "kind": "lora",
            "base_version": base_version,
            "rank": int(config.r),
            "alpha": float(config.lora_alpha),
            "target_modules": names,
        }
    )


# --- saving -----------------------------------------------------------------------------------


WEIGHTS_FILE = "model.safetensors"
"""The file ``save_policy`` writes the weights to (the name save_pretrained gives one shard)."""


def save_policy(
    policy: PreTrainedModel, tokenizer: Any, out_dir: Path, dtype: torch.dtype | None = None, digest: str = "blake3"
) -> dict[str, tuple[str, int]]:
    """Write ``policy`` as a Hugging Face directory (config.json, generation config, tokenizer,
    safetensors) that the inference service can hot-swap in place of the policy it was loaded from,
    and return its weight file's (hex ``digest``, bytes), computed as it was written
    (``ModelStore.publish(..., hashed=)`` then never reads it back).

    The files are what ``save_pretrained`` writes (tests/unit/services/trainer/test_models.py
    compares them), but the weights go straight from the parameters to the file: one tensor at a
    time, cast on the way, with no copy of the model and no second read.

    ``dtype``: cast the weights to it (the dtype of the published policy, see
    shared/models/loading.py's ``weights_dtype``), so the tensor names, shapes and dtypes match
    what services/inference/weights.py checks.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(policy.config)
    config.architectures = [type(policy).__name__]
    config.dtype = dtype if dtype is not None else next(policy.parameters()).dtype  # as save_pretrained records it
    config.save_pretrained(out_dir)
    if policy.can_generate() and policy.generation_config is not None:
        policy.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    pickled = [p.name for p in out_dir.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise RuntimeError(f"save_pretrained wrote pickle files {pickled}; the model store would refuse them")
    weights = write_safetensors(out_dir / WEIGHTS_FILE, tensors_to_save(policy), digest, {"format": "pt"}, cast=dtype)
    return {WEIGHTS_FILE: weights}


def tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor once: a tied weight (the same storage under two
    names, e.g. ``lm_head.weight`` = ``model.embed_tokens.weight``) under its first name, as
    ``save_pretrained`` keeps it and as vLLM's loaders expect."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = t
    return tensors


def save_adapter(peft_model: PeftModel, out_dir: Path, base_version: str) -> Path:
    """Write ``peft_model``'s adapter as an adapter version's files (shared/models/adapters.py):
    PEFT's ``save_pretrained(safe_serialization=True)``, only ADAPTER_FILES kept (PEFT's README
    model card is dropped), ``base_model_name_or_path`` set to ``base_version`` (not a local path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    for path in out_dir.rglob("*"):
        if path.is_file() and path.relative_to(out_dir).as_posix() not in ADAPTER_FILES:
            path.unlink()
    missing = [name for name in ADAPTER_FILES if not (out_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"PEFT's save_pretrained wrote no {', '.join(missing)} in {out_dir}")
    config_path = out_dir / ADAPTER_CONFIG
    config = json.loads(config_path.read_bytes())
    config["base_model_name_or_path"] = base_version
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
