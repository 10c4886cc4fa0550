"""shared/models/loading.py: verified loads, float32 from safetensors only, tokenizer round trip,
the dtype read from safetensors headers. A tiny random Llama (hidden 16, one layer) with the
default chat tokenizer, built once per module in well under a second."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from shared.events import Message
from shared.model_store import CorruptVersionError, ModelStore
from shared.models.default_model import train_tokenizer
from shared.models.encoding import render_prompt
from shared.models.loading import (
    load_backbone,
    load_causal_lm,
    load_tokenizer,
    load_verified_policy,
    quiet_transformers,
    verified_dir,
    weights_dtype,
)

CORPUS = "\n".join(f"What is {a} plus 3? {a} plus 3 is {a + 3}. Hello there, how are you?" for a in range(40))


def make_tiny_policy(out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    out_dir.mkdir(parents=True)
    corpus = out_dir.parent / f"{out_dir.name}-corpus.txt"
    corpus.write_text(CORPUS)
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
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return make_tiny_policy(tmp_path_factory.mktemp("loading") / "policy")


@pytest.fixture()
def store(tmp_path, policy_dir) -> ModelStore:
    store = ModelStore(tmp_path / "models")
    store.publish("policy", policy_dir)
    return store


@pytest.fixture()
def no_weight_loads(monkeypatch):
    """Any attempt to build a model from a checkpoint fails the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModel, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_a_corrupt_version_is_refused_before_anything_is_loaded(store, no_weight_loads):
    weights = store.path("policy-0001") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match="sha256"):
        verified_dir(store, "policy-0001")
    with pytest.raises(CorruptVersionError):
        load_verified_policy(store, "policy-0001")


def test_a_verified_policy_loads_in_float32_in_eval_mode(store, policy_dir):
    assert verified_dir(store, "policy-0001") == store.path("policy-0001")
    tokenizer, model = load_verified_policy(store, "policy-0001")
    assert tokenizer.eos_token == "<|end|>"
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    reference = LlamaForCausalLM.from_pretrained(str(policy_dir))
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_load_causal_lm_asks_transformers_for_safetensors_only(policy_dir, monkeypatch):
    import transformers

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return original(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model = load_causal_lm(policy_dir, train=True)
    assert seen["use_safetensors"] is True and seen["dtype"] == torch.float32
    assert model.training


def test_a_bf16_checkpoint_loads_in_the_dtype_asked_for(tmp_path):
    bf16_dir = make_tiny_policy(tmp_path / "bf16", dtype=torch.bfloat16)
    assert {p.dtype for p in load_causal_lm(bf16_dir).parameters()} == {torch.float32}
    assert {p.dtype for p in load_causal_lm(bf16_dir, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


class _Trap:
    """Unpickling this writes a file: proof that a pickle was read."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.write_text, (self.sentinel, "unpickled"))


def test_a_pickle_weight_file_is_never_read(policy_dir, tmp_path, monkeypatch):
    sentinel = tmp_path / "unpickled"
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    trap = pickle.dumps(_Trap(sentinel))

    beside = tmp_path / "beside"  # safetensors and a pickle: the safetensors are loaded
    beside.mkdir()
    for f in policy_dir.iterdir():
        (beside / f.name).write_bytes(f.read_bytes())
    (beside / "pytorch_model.bin").write_bytes(trap)
    load_causal_lm(beside)

    only = tmp_path / "only-pickle"  # nothing but a pickle: refused, not read
    only.mkdir()
    for f in policy_dir.iterdir():
        if f.suffix != ".safetensors":
            (only / f.name).write_bytes(f.read_bytes())
    (only / "pytorch_model.bin").write_bytes(trap)
    with pytest.raises(OSError):
        load_causal_lm(only)
    with pytest.raises(OSError):
        load_backbone(only)
    assert not sentinel.exists()


def test_the_backbone_is_the_model_without_its_unembedding(policy_dir):
    backbone, missing = load_backbone(policy_dir)
    assert missing == []
    assert not hasattr(backbone, "lm_head") and backbone.config.hidden_size == 16
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}


def test_the_tokenizer_round_trips_text_and_keeps_its_chat_template(policy_dir):
    tokenizer = load_tokenizer(policy_dir)
    for text in ("What is 4 plus 3? 4 plus 3 is 7.", "naïve café, 日本語"):
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.chat_template
    ids = render_prompt(tokenizer, [Message("user", "What is 4 plus 3?")])
    assert tokenizer.decode(ids) == "<|bos|><|user|>\nWhat is 4 plus 3?<|end|>\n<|assistant|>\n"


def test_weights_dtype_is_read_from_the_safetensors_headers(policy_dir, tmp_path):
    assert weights_dtype(policy_dir) == torch.float32
    assert weights_dtype(make_tiny_policy(tmp_path / "bf16", dtype=torch.bfloat16)) == torch.bfloat16
    # Only the header is read: a file cut right after it still answers.
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (policy_dir / "model.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    assert "F32" in json.dumps(json.loads(data[8 : 8 + header_len]))
    (cut / "model.safetensors").write_bytes(data[: 8 + header_len])
    assert weights_dtype(cut) == torch.float32
    assert weights_dtype(tmp_path / "empty") == torch.float32  # no safetensors at all: the default


def test_quiet_transformers_silences_the_load_report_and_restores_it():
    before = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    with quiet_transformers():
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.get_verbosity() == before and hf_logging.is_progress_bar_enabled() == bar
    with pytest.raises(RuntimeError), quiet_transformers():
        raise RuntimeError("restored on errors too")
    assert hf_logging.get_verbosity() == before
