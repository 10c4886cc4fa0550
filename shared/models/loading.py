"""The one place that loads models and tokenizers from disk or from the model store.

    model_dir = verified_dir(store, "policy-0003")         # sha256 of every file checked first
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, train=True)         # float32, safetensors only
    tokenizer, model = load_verified_policy(store, "policy-0003")   # both in one call

Weights are only ever read with safetensors (``use_safetensors=True``): a pickle file beside them
(``pytorch_model.bin``) is never opened. A version from the store is verified against its manifest
before a byte of it is parsed (``ModelStore.verify`` raises ``CorruptVersionError``). The reward
model's own loader is shared/models/reward_model.py's ``load_version``; it loads its backbone and
tokenizer through this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shared.model_store import ModelStore

if TYPE_CHECKING:  # transformers is imported where it is used: it takes seconds to import
    from transformers import PreTrainedModel

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


def load_verified_policy(
    store: ModelStore, version: str, *, dtype: torch.dtype = torch.float32, train: bool = False
) -> tuple[Any, PreTrainedModel]:
    """(tokenizer, causal LM) of a policy version of the store, verified first (``verified_dir``)."""
    model_dir = verified_dir(store, version)
    return load_tokenizer(model_dir), load_causal_lm(model_dir, dtype=dtype, train=train)


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
