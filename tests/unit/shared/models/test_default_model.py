from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from shared.model_store import PICKLE_SUFFIXES, ModelStore, load_safetensors_state_dict
from shared.models.default_model import (
    DEFAULT_CORPUS,
    END,
    SPECIAL_TOKENS,
    DefaultModelSpec,
    create_default_model,
    ensure_default_policy,
    train_tokenizer,
)

# Small enough to build in a fraction of a second; head_dim 64 is still one vLLM's CPU backend runs.
TINY = DefaultModelSpec(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=1, num_kv_heads=1
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DEFAULT_CORPUS, TINY.vocab_size)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default-model")
    create_default_model(out, TINY)
    return out


def logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_tokenizer_roundtrips_corpus_lines_and_unseen_text(tokenizer) -> None:
    lines = DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines()[:300]
    for text in [*lines, "  naïve café — 3×4 = 12\n\ttabs", "日本語"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert not set(ids) & set(tokenizer.all_special_ids)  # plain text never gains special tokens


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert len(tokenizer) == TINY.vocab_size
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert tokenizer.eos_token == END == "<|end|>"
    assert (tokenizer.bos_token, tokenizer.pad_token) == ("<|bos|>", "<|pad|>")
    for marker in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tokenizer.encode(marker)) == 1


def test_tokenizer_splits_digits(tokenizer) -> None:
    assert tokenizer.tokenize("1234") == ["1", "2", "3", "4"]


def test_chat_template(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "2 plus 2 is 4."},
        {"role": "user", "content": "Thanks!"},
    ]

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2 plus 2?<|end|>\n"
        "<|assistant|>\n2 plus 2 is 4.<|end|>\n<|user|>\nThanks!<|end|>\n<|assistant|>\n"
    )
    without_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert without_prompt.endswith("What is 2 plus 2?<|end|>\n")
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_spec_validates_head_dim() -> None:
    assert DefaultModelSpec().head_dim == 64
    with pytest.raises(ValueError, match="head_dim 16"):
        DefaultModelSpec(hidden_size=128, num_heads=8, num_kv_heads=8)
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        DefaultModelSpec(hidden_size=130, num_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        DefaultModelSpec(num_heads=2, num_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        DefaultModelSpec(vocab_size=100)


def test_create_writes_only_safetensors(model_dir: Path) -> None:
    names = {p.name for p in model_dir.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names and "config.json" in names
    assert not [n for n in names if Path(n).suffix in PICKLE_SUFFIXES]


def test_created_model_config_and_generation_eos(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    end_id = tok.convert_tokens_to_ids(END)

    assert model.config.model_type == "llama" and model.config.tie_word_embeddings is False
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == end_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == end_id
    assert model.dtype == torch.float32


def test_created_model_reloads_with_identical_logits(model_dir: Path, tokenizer) -> None:
    ids = tokenizer.encode("What is 7 plus 5? 7 plus 5 is 12.")
    rebuilt = LlamaForCausalLM(LlamaConfig.from_pretrained(model_dir))
    rebuilt.load_state_dict(load_safetensors_state_dict(model_dir))
    with torch.no_grad():
        expected = rebuilt(torch.tensor([ids])).logits

    assert torch.equal(logits(model_dir, ids), expected)


def test_seed_determines_weights(model_dir: Path, tmp_path: Path) -> None:
    ids = [0, 4, 100, 200]
    same, other = tmp_path / "same", tmp_path / "other"
    create_default_model(same, TINY)
    create_default_model(other, DefaultModelSpec(**{**TINY.__dict__, "seed": 1}))

    assert torch.equal(logits(same, ids), logits(model_dir, ids))
    assert not torch.equal(logits(other, ids), logits(model_dir, ids))


def test_ensure_default_policy_is_idempotent(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")

    first = ensure_default_policy(store, TINY)
    second = ensure_default_policy(store, TINY)

    assert first == second == "policy-0001"
    assert store.versions("policy") == ["policy-0001"]
    manifest = store.verify(first)
    assert manifest.metrics["params"] > 0
    assert manifest.extra == {"kind": "default-random-init"}
    assert manifest.parent is None
