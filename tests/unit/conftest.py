"""A tiny causal LM (random Llama, hidden 16, one layer) with the default chat tokenizer, built once
per session in well under a second: a stand-in policy for the reward model's unit tests, here so
that both tests/unit/services/reward/ and tests/unit/shared/models/ see it; `rm` is a fresh reward
model on it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_CORPUS = "\n".join(
    f"What is {a} plus {b}? {a} plus {b} is {a + b}. I am not sure, sorry. Hello there, how are you today?"
    for a in range(1, 40)
    for b in (3, 7)
)


def make_tiny_policy(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shared.models.default_model import train_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir.parent / f"{out_dir.name}-corpus.txt"
    corpus.write_text(TINY_CORPUS)
    tok = train_tokenizer(corpus, 300)
    corpus.unlink()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    return make_tiny_policy(tmp_path_factory.mktemp("tiny") / "policy")


@pytest.fixture()
def tiny_store(tmp_path, tiny_policy_dir):
    """A fresh model store holding the tiny policy as policy-0001."""
    from shared.model_store import ModelStore

    store = ModelStore(tmp_path / "models")
    store.publish("policy", tiny_policy_dir)
    return store


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_policy_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_policy_dir))


@pytest.fixture()
def rm(tiny_policy_dir):
    import torch

    from shared.models.reward_model import RewardModel

    torch.manual_seed(0)
    return RewardModel.from_policy_dir(tiny_policy_dir)


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
