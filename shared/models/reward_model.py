"""The reward model: a causal-LM backbone without its unembedding, and a scalar head.

As in InstructGPT, the RM is the SFT model (here: a policy version) with the unembedding layer
(``lm_head``) removed and a linear head from the last hidden state to one scalar:

    h      = backbone(input_ids, attention_mask).last_hidden_state      (batch, seq, hidden)
    last   = attention_mask.sum(1) - 1            the last real token (sequences are RIGHT-padded)
    reward = score_head(h[b, last[b]]) - offset

The last token is the EOS that ends the assistant turn (see encoding.py): with causal attention it
is the one position that has seen the whole prompt and the whole response. ``offset`` is a buffer,
not a parameter: the optimiser never touches it; after training it is set so that reference
responses score 0 on average (InstructGPT's normalisation before RL, see offline.py).

Any Hugging Face causal-LM directory can be the backbone (``AutoModel`` builds its base model).

An RM version directory (published to the model store as ``rm-NNNN``):

    config.json           the backbone's transformers config
    tokenizer files       the backbone's tokenizer, chat template included
    model.safetensors     backbone.*, score_head.weight, score_head.bias, offset
    reward_head.json      format, pooling, hidden size, offset and what it was computed on

Weights are only ever read with safetensors (never torch.load / pickle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.models.loading import load_backbone, load_tokenizer, quiet_transformers

WEIGHTS_NAME = "model.safetensors"
HEAD_NAME = "reward_head.json"
HEAD_FORMAT = 1


class RewardModelError(ValueError):
    """An RM directory that cannot be loaded (missing files, wrong tensors, bad reward_head.json)."""


class RewardModel(nn.Module):
    offset: torch.Tensor
    """The normalisation offset, a registered buffer (declared for the type checker)."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.score_head = nn.Linear(hidden_size, 1)
        # A buffer: saved with the weights, moved with the model, never given a gradient.
        self.register_buffer("offset", torch.zeros((), dtype=torch.float32))
        self.info: dict[str, Any] = {}
        """Descriptive fields written to reward_head.json (e.g. what the offset was computed on)."""

    @property
    def hidden_size(self) -> int:
        return self.score_head.in_features

    def init_head(self, seed: int = 0) -> None:
        """Small random head, zero bias: N(0, 1/(hidden+1)) as in OpenAI's lm-human-preferences."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.score_head.weight.copy_(
                torch.randn(self.score_head.weight.shape, generator=gen) / (self.hidden_size + 1) ** 0.5
            )
            self.score_head.bias.zero_()

    def raw_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Head output at the last real token of each right-padded sequence, before the offset: (batch,)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        last = attention_mask.long().sum(dim=1) - 1
        if (last < 0).any():
            raise ValueError("every sequence needs at least one token")
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score_head(pooled).squeeze(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (batch,) = raw head output minus the normalisation offset."""
        return self.raw_scores(input_ids, attention_mask) - self.offset

    def set_offset(self, value: float, reference: str = "") -> None:
        self.offset.fill_(float(value))
        self.info["offset_reference"] = reference

    # --- building, saving, loading ------------------------------------------------------------

    @classmethod
    def from_policy_dir(cls, policy_dir: Path, seed: int = 0) -> RewardModel:
        """Backbone = the causal LM in ``policy_dir`` without its lm_head; a fresh head, offset 0."""
        backbone, missing = load_backbone(policy_dir)
        if missing:
            raise RewardModelError(f"{policy_dir}: backbone weights missing from the checkpoint: {missing[:5]}")
        model = cls(backbone, _hidden_size(backbone.config))
        model.init_head(seed)
        model.info["backbone_source"] = Path(policy_dir).name
        return model

    def save(self, out_dir: Path, tokenizer: Any) -> None:
        """Write config.json, the tokenizer, model.safetensors and reward_head.json to ``out_dir``."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config: Any = self.backbone.config  # the backbone's transformers config (nn.Module does not declare it)
        config.architectures = [type(self.backbone).__name__]
        config.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        # Shared tensors (tied weights) would make save_file refuse: store each once, contiguous.
        state = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        head = {
            "format": HEAD_FORMAT,
            "pooling": "last_token",
            "padding_side": "right",
            "hidden_size": self.hidden_size,
            "backbone_class": type(self.backbone).__name__,
            "offset": float(self.offset),
            **{k: v for k, v in self.info.items() if k not in {"offset"}},
        }
        (out_dir / HEAD_NAME).write_text(json.dumps(head, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, model_dir: Path) -> RewardModel:
        """Build the RM from a directory written by ``save`` (call ``ModelStore.verify`` first).

        Raises RewardModelError when a file is missing or the tensors do not match the config.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel

        model_dir = Path(model_dir)
        head = read_head_info(model_dir)
        weights = model_dir / WEIGHTS_NAME
        if not weights.is_file():
            raise RewardModelError(f"{model_dir.name}: {WEIGHTS_NAME} is missing")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise RewardModelError(f"{model_dir.name}: unreadable {WEIGHTS_NAME}: {exc}") from None
        try:
            config = AutoConfig.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:
            raise RewardModelError(f"{model_dir.name}: unreadable config.json: {exc}") from None
        with quiet_transformers():
            backbone = AutoModel.from_config(config, dtype=torch.float32)
        model = cls(backbone, _hidden_size(config))
        if model.hidden_size != head.get("hidden_size"):
            raise RewardModelError(
                f"{model_dir.name}: {HEAD_NAME} says hidden size {head.get('hidden_size')}, "
                f"the config {model.hidden_size}"
            )
        expected = model.state_dict()
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        if missing or unexpected:
            raise RewardModelError(
                f"{model_dir.name}: {WEIGHTS_NAME} does not match the config: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise RewardModelError(
                    f"{model_dir.name}: tensor {name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(expected[name].shape)}"
                )
        model.load_state_dict(state, strict=True)
        model.info = {
            k: v
            for k, v in head.items()
            if k not in {"format", "pooling", "padding_side", "hidden_size", "backbone_class", "offset"}
        }
        return model.eval()


@dataclass(frozen=True)
class LoadedRewardModel:
    """An RM version ready to score: model (eval mode), tokenizer, and where it came from."""

    version: str
    model: RewardModel
    tokenizer: Any
    parent: str | None = None
    published_at: float = 0.0
    metrics: dict | None = None


def load_version(store: Any, version: str, manifest: Any = None) -> LoadedRewardModel:
    """Verify every file's digest against the manifest, then load; raises on any problem.

    A corrupt version raises shared.model_store.CorruptVersionError before a byte of it is parsed.
    ``manifest``: the version was verified just now (a follower did), do not hash it again.
    """
    if manifest is None:
        manifest = store.verify(version)
    model_dir = store.path(version)
    model = RewardModel.load(model_dir)
    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as exc:
        raise RewardModelError(f"{version}: unreadable tokenizer: {exc}") from None
    return LoadedRewardModel(version, model, tokenizer, manifest.parent, manifest.created_at, dict(manifest.metrics))


def read_head_info(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / HEAD_NAME
    try:
        head = json.loads(path.read_text())
    except FileNotFoundError:
        raise RewardModelError(f"{Path(model_dir).name}: {HEAD_NAME} is missing (not a reward model?)") from None
    except (OSError, ValueError) as exc:
        raise RewardModelError(f"{Path(model_dir).name}: unreadable {HEAD_NAME}: {exc}") from None
    if not isinstance(head, dict) or head.get("format") != HEAD_FORMAT:
        raise RewardModelError(f"{Path(model_dir).name}: unsupported {HEAD_NAME} format")
    if head.get("pooling") != "last_token" or head.get("padding_side") != "right":
        raise RewardModelError(
            f"{Path(model_dir).name}: {HEAD_NAME} asks for pooling {head.get('pooling')!r} / "
            f"padding {head.get('padding_side')!r}; only last_token / right exist"
        )
    return head


def _hidden_size(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(text, name, None):
            return int(getattr(text, name))
    raise RewardModelError(f"cannot tell the hidden size of a {type(config).__name__}")
