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
    AdapterVersionError,
    autocast_dtype,
    device_problems,
    load_backbone,
    load_causal_lm,
    load_tokenizer,
    load_verified_policy,
    quiet_transformers,
    resolve_verified,
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
    with pytest.raises(CorruptVersionError, match="does not match its blake3 digest"):
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


# --- adapter versions ------------------------------------------------------------------------------


def publish_adapter(store: ModelStore, policy_dir: Path, tmp_path: Path, base: str, **extra_overrides) -> str:
    """A LoRA adapter of the tiny policy (PEFT, B set to non-zero so it changes the outputs), published
    as an adapter version naming ``base``."""
    from peft import LoraConfig, get_peft_model

    from shared.models.adapters import adapter_extra

    peft_model = get_peft_model(
        load_causal_lm(policy_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path / f"adapter-{len(store.versions('policy'))}"
    peft_model.save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    extra = adapter_extra(base_version=base, rank=2, alpha=4, target_modules=["q_proj", "v_proj"])
    return store.publish("policy", out, extra={"adapter": {**extra, **extra_overrides}}).version


def test_a_full_weight_version_resolves_to_itself(store):
    resolved = resolve_verified(store, "policy-0001")
    assert resolved.weights_dir == store.path("policy-0001") and resolved.weights_version == "policy-0001"
    assert resolved.adapter_dir is None and resolved.adapter is None


def test_an_adapter_version_resolves_to_its_verified_base_and_loads_merged(store, policy_dir, tmp_path):
    from peft import PeftModel

    version = publish_adapter(store, policy_dir, tmp_path, "policy-0001")
    resolved = resolve_verified(store, version)
    assert (resolved.weights_version, resolved.weights_dir) == ("policy-0001", store.path("policy-0001"))
    assert resolved.adapter_dir == store.path(version) and resolved.adapter.rank == 2
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        unmerged = PeftModel.from_pretrained(load_causal_lm(policy_dir), str(store.path(version)))(input_ids=ids)
        tokenizer, merged = load_verified_policy(store, version)
        assert not hasattr(merged, "peft_config")  # a plain transformers model
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged.logits, atol=1e-5, rtol=1e-4)
        base = load_causal_lm(policy_dir)(input_ids=ids).logits
        assert not torch.allclose(base, unmerged.logits)  # the adapter does change the outputs
    assert tokenizer.eos_token_id is not None


@pytest.mark.parametrize(
    "base, overrides, words",
    [
        ("policy-0000", {}, "policy-0000 is not in the store"),
        ("policy-0001", {"rank": 8}, "r=2 but the manifest says rank 8"),
        ("policy-0001", {"kind": "ia3"}, "unknown"),
    ],
)
def test_an_adapter_that_breaks_the_contract_is_refused_before_loading(
    store, policy_dir, tmp_path, base, overrides, words
):
    import re

    version = publish_adapter(store, policy_dir, tmp_path, base, **overrides)
    with pytest.raises(AdapterVersionError, match=re.escape(words)):
        resolve_verified(store, version)
    with pytest.raises(AdapterVersionError):
        load_verified_policy(store, version)


def test_a_tampered_adapter_is_refused_by_its_manifest(store, policy_dir, tmp_path):
    version = publish_adapter(store, policy_dir, tmp_path, "policy-0001")
    weights = store.path(version) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match="does not match its blake3 digest"):
        resolve_verified(store, version)


# --- device and precision -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, device_type, expected",
    [
        ("auto", "cpu", None),  # float32 stays the CPU default
        ("auto", "cuda", torch.bfloat16),
        ("bf16", "cpu", torch.bfloat16),
        ("bf16", "cuda", torch.bfloat16),
        ("float32", "cuda", None),
        ("float32", "cpu", None),
    ],
)
def test_autocast_dtype(precision, device_type, expected):
    assert autocast_dtype(precision, device_type) == expected


def test_autocast_dtype_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        autocast_dtype("fp8", "cpu")


@pytest.mark.parametrize(
    "device, cuda_devices, words",
    [
        ("cpu", 0, None),
        ("cuda", 1, None),
        ("cuda:1", 2, None),
        ("cuda:2", 2, "2 CUDA device"),
        ("cuda", 0, "0 CUDA device"),
        ("cpu:1", 0, "has no index"),
        ("meta", 0, "only cpu and cuda"),
        ("banana", 0, "not a torch device"),
    ],
)
def test_device_problems(device, cuda_devices, words):
    problems = device_problems(device, cuda_devices)
    if words is None:
        assert problems == []
    else:
        assert len(problems) == 1 and words in problems[0]
