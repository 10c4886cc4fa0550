"""The one place that loads models and tokenizers from disk or from the model store.

    model_dir = verified_dir(store, "policy-0003")         # every file's digest checked first
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, train=True)         # float32, safetensors only
    tokenizer, model = load_verified_policy(store, "policy-0003")   # both in one call
    resolved = resolve_verified(store, "policy-0007")     # an adapter version: its base's directory too

Weights are only ever read with safetensors (``use_safetensors=True``): a pickle file beside them
(``pytorch_model.bin``) is never opened. A version from the store is verified against its manifest
before a byte of it is parsed (``ModelStore.verify`` raises ``CorruptVersionError``). The reward
model's own loader is shared/models/reward_model.py's ``load_version``; it loads its backbone and
tokenizer through this module.

An adapter version (shared/models/adapters.py) is resolved to its base's weights plus its adapter
(``resolve_verified``: both verified, the adapter checked against the contract first);
``load_verified_policy`` returns it merged into full weights (PEFT's ``merge_and_unload``), so every
reader of a policy version gets a plain causal LM whichever kind it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shared.model_store import ModelStore, ModelStoreError
from shared.models.adapters import EXTRA_KEY, AdapterInfo, adapter_info, adapter_problem

if TYPE_CHECKING:  # transformers is imported where it is used: it takes seconds to import
    from transformers import PreTrainedModel

PRECISIONS = ("auto", "float32", "bf16")
"""Compute precision of the forward passes: ``bf16`` autocast, ``float32``, or ``auto`` (bf16 on an
accelerator, float32 on the CPU). Weights and optimiser state stay float32 either way."""
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
"""The floating dtypes a safetensors header names, as torch dtypes."""


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar inside the block (restored on exit).

    For loads whose report is expected noise, e.g. the lm_head a reward model's backbone drops.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def verified_dir(store: ModelStore, version: str) -> Path:
    """The directory of ``version`` after checking every file against its manifest (raises if corrupt)."""
    store.verify(version)
    return store.path(version)


def load_tokenizer(model_dir: Path) -> Any:
    """The Hugging Face tokenizer (chat template included) saved in ``model_dir``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_causal_lm(
    model_dir: Path, *, dtype: torch.dtype = torch.float32, train: bool = False, quiet: bool = False
) -> PreTrainedModel:
    """The causal LM in ``model_dir`` in ``dtype``, weights from safetensors only.

    ``train``: in train mode (dropout on) instead of eval mode. ``quiet``: without transformers'
    load report and progress bar (see ``quiet_transformers``).
    """
    from transformers import AutoModelForCausalLM

    with quiet_transformers() if quiet else nullcontext():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True)
    return model.train(train)


def load_backbone(model_dir: Path, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list[str]]:
    """(base model, names of its weights missing from the checkpoint) of the causal LM in ``model_dir``:
    the model without its unembedding (``AutoModel``), safetensors only, load report silenced."""
    from transformers import AutoModel

    with quiet_transformers():
        backbone, info = AutoModel.from_pretrained(
            str(model_dir), dtype=dtype, output_loading_info=True, use_safetensors=True
        )
    return backbone, sorted(info.get("missing_keys") or ())


class AdapterVersionError(ModelStoreError):
    """An adapter version that may not be loaded (shared/models/adapters.py's ``adapter_problem``)."""


@dataclass(frozen=True)
class ResolvedVersion:
    """A policy version's directories after verification: full weights, and the adapter if any."""

    version: str
    weights_version: str
    """The full-weight version holding the weights: ``version`` itself, or its adapter's base."""
    weights_dir: Path
    adapter_dir: Path | None
    """The adapter version's directory (None: a full-weight version)."""
    adapter: AdapterInfo | None


def resolve_verified(store: ModelStore, version: str) -> ResolvedVersion:
    """Verify ``version`` (every file against its manifest) and, when it is an adapter version, check
    it against the adapter contract (base present, full weights, config agreeing; AdapterVersionError
    naming the problem) and verify its base too."""
    manifest = store.verify(version)
    if EXTRA_KEY not in manifest.extra:
        return ResolvedVersion(version, version, store.path(version), None, None)
    problem = adapter_problem(manifest, store=store, version_dir=store.path(version))
    if problem is not None:
        raise AdapterVersionError(problem)
    info = adapter_info(manifest)
    assert info is not None  # adapter_problem found none
    return ResolvedVersion(
        version, info.base_version, verified_dir(store, info.base_version), store.path(version), info
    )


def load_adapted_causal_lm(
    weights_dir: Path, adapter_dir: Path, *, dtype: torch.dtype = torch.float32, train: bool = False
) -> PreTrainedModel:
    """The causal LM in ``weights_dir`` with the PEFT adapter in ``adapter_dir`` merged into its
    weights (``merge_and_unload``): a plain transformers model, the adapter's update included."""
    from peft import PeftModel

    base = load_causal_lm(weights_dir, dtype=dtype, train=train, quiet=True)
    merged: PreTrainedModel = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.train(train)


def load_verified_policy(
    store: ModelStore, version: str, *, dtype: torch.dtype = torch.float32, train: bool = False
) -> tuple[Any, PreTrainedModel]:
    """(tokenizer, causal LM) of a policy version of the store, verified first (``verified_dir``);
    an adapter version comes merged into its base's weights (``resolve_verified``)."""
    resolved = resolve_verified(store, version)
    tokenizer = load_tokenizer(resolved.weights_dir)
    if resolved.adapter_dir is None:
        return tokenizer, load_causal_lm(resolved.weights_dir, dtype=dtype, train=train)
    return tokenizer, load_adapted_causal_lm(resolved.weights_dir, resolved.adapter_dir, dtype=dtype, train=train)


def weights_dtype(model_dir: Path) -> torch.dtype:
    """The floating dtype of the tensors in ``model_dir``'s safetensors files (headers only; float32
    when none names one)."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        for name, info in header.items():
            if name != "__metadata__" and info.get("dtype") in SAFETENSORS_DTYPES:
                return SAFETENSORS_DTYPES[info["dtype"]]
    return torch.float32


def device_problems(device: str, cuda_devices: int | None = None) -> list[str]:
    """Why ``device`` cannot hold a model here, or []: ``cpu``, ``cuda`` or ``cuda:N`` with N below
    the number of visible CUDA devices (``cuda_devices``; torch's count when None)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return [f"device {device!r} is not a torch device (cpu, cuda or cuda:N)"]
    if parsed.type == "cpu":
        return [] if parsed.index is None else [f"device {device!r}: the CPU has no index (use cpu)"]
    if parsed.type != "cuda":
        return [f"device {device!r}: only cpu and cuda devices are supported"]
    count = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    index = parsed.index or 0
    if index >= count:
        return [f"device {device!r}: {count} CUDA device(s) visible"]
    return []


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device_type``:

    bf16 -> torch.bfloat16;  float32 -> None (no autocast);
    auto -> torch.bfloat16 on an accelerator (cuda), None on the CPU (bf16 matmuls on a CPU
            without AMX are slower than float32, and the CPU results stay bit-stable)."""
    if precision == "bf16" or (precision == "auto" and device_type != "cpu"):
        return torch.bfloat16
    if precision in ("auto", "float32"):
        return None
    raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
