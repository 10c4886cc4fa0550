"""Policy, reference and value models (services/trainer/models.py) on the default model and an RM made from it."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from services.inference.weights import check_compatible, tensor_signature
from services.trainer.models import (
    WEIGHTS_FILE,
    LoraSettings,
    ModelSettings,
    PolicyHead,
    PolicyValueHead,
    attach_lora,
    frozen_copy,
    load_adapter,
    load_policy,
    load_value_model,
    lora_info,
    save_adapter,
    save_policy,
)
from services.trainer.rollout_batch import Rollout, collate_rollouts
from shared.durable_files import file_digest
from shared.models.loading import load_tokenizer, weights_dtype
from shared.models.reward_model import RewardModel


def _batch(tokenizer, prompts, responses):
    rollouts = [Rollout([], p, r, None, "v", "stop", 0.0) for p, r in zip(prompts, responses)]
    return collate_rollouts(rollouts, tokenizer.pad_token_id, tokenizer.eos_token_id)


PROMPTS = [[0, 4, 10, 11, 12], [0, 4, 13]]
RESPONSES = [[20, 21, 22, 6], [30, 31, 32, 33, 34, 6]]  # 6 = <|end|>, the EOS of the default tokenizer


def test_policy_head_logprobs_equal_the_full_model_on_right_padded_batches(trainer_store, one_thread):
    policy_dir = trainer_store.path(trainer_store.policy)
    tokenizer = load_tokenizer(policy_dir)
    assert tokenizer.eos_token_id == 6
    lm = load_policy(policy_dir)
    batch = _batch(tokenizer, PROMPTS, RESPONSES)
    with torch.no_grad():
        logprobs, entropy, _ = PolicyHead(lm)(
            batch.input_ids, batch.attention_mask, batch.response_positions, batch.response_ids
        )
        for b, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
            ids = torch.tensor([prompt + response])
            full = torch.log_softmax(lm(input_ids=ids).logits[0], -1)  # each sequence alone, unpadded
            expected = [full[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(response)]
            assert logprobs[b, : len(response)].tolist() == pytest.approx(expected, abs=1e-4)
            dist = torch.distributions.Categorical(logits=full[len(prompt) - 1 : len(prompt) - 1 + len(response)])
            assert entropy[b, : len(response)].tolist() == pytest.approx(dist.entropy().tolist(), abs=1e-4)
        # Temperature divides the logits.
        hot, _, _ = PolicyHead(lm, temperature=2.0)(
            batch.input_ids, batch.attention_mask, batch.response_positions, batch.response_ids
        )
        assert not torch.allclose(hot[0, :4], logprobs[0, :4])


def test_policy_head_ptx_nll_is_the_causal_lm_loss(trainer_store, one_thread):
    lm = load_policy(trainer_store.path(trainer_store.policy))
    ids = torch.tensor([[0, 40, 41, 42, 43, 44], [0, 50, 51, 52, 53, 54]])
    batch = _batch(load_tokenizer(trainer_store.path(trainer_store.policy)), PROMPTS, RESPONSES)
    with torch.no_grad():
        _, _, nll = PolicyHead(lm)(
            batch.input_ids,
            batch.attention_mask,
            batch.response_positions,
            batch.response_ids,
            ids,
            torch.ones_like(ids),
        )
        expected = lm(input_ids=ids, labels=ids).loss
    assert nll.shape == (2, 5)
    assert nll.mean().item() == pytest.approx(expected.item(), rel=1e-5)


def test_value_head_at_each_position_is_the_reward_model_on_that_prefix(trainer_store, one_thread):
    rm_dir = trainer_store.path(trainer_store.rm)
    tokenizer = load_tokenizer(rm_dir)
    value = load_value_model(rm_dir)
    rm = RewardModel.load(rm_dir)
    with torch.no_grad():
        rm.offset.fill_(0.25)
        value.offset.fill_(0.25)
        batch = _batch(tokenizer, PROMPTS, RESPONSES)
        values = value(batch.input_ids, batch.attention_mask, batch.response_positions)
        for b, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
            # V(state before response token j) reads the state after prompt + response[:j]: the RM's score of that prefix.
            for j in range(len(response)):
                prefix = torch.tensor([prompt + response[:j]])
                expected = rm(prefix, torch.ones_like(prefix)).item()
                assert values[b, j].item() == pytest.approx(expected, abs=1e-4)
    # The value model is trainable and does not share tensors with the loaded RM.
    assert all(p.requires_grad for p in value.parameters())


def test_frozen_copy_has_no_gradients_and_own_storage(trainer_store):
    lm = load_policy(trainer_store.path(trainer_store.policy))
    ref = frozen_copy(lm)
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    with torch.no_grad():
        next(lm.parameters()).add_(1.0)
    assert not torch.equal(next(lm.parameters()), next(ref.parameters()))


def test_saved_policy_is_hot_swappable_in_place_of_its_source(trainer_store, tmp_path):
    src = trainer_store.path(trainer_store.policy)
    lm = load_policy(src)
    with torch.no_grad():
        lm.lm_head.weight.mul_(0.5)
    out = tmp_path / "new"
    hashed = save_policy(lm, load_tokenizer(src), out, dtype=weights_dtype(src))
    assert hashed == {WEIGHTS_FILE: file_digest(out / WEIGHTS_FILE, "blake3")}  # hashed as written
    check_compatible(src, out)  # what the inference service checks before a swap
    assert tensor_signature(src) == tensor_signature(out)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 6
    reloaded = load_policy(out)
    assert torch.equal(reloaded.lm_head.weight, lm.lm_head.weight)
    assert not any(p.suffix in {".bin", ".pt", ".pkl"} for p in out.iterdir())


def test_saved_policy_is_cast_back_to_the_published_dtype(trainer_store, tmp_path):
    src = trainer_store.path(trainer_store.policy)
    lm = load_policy(src)
    out = tmp_path / "bf16"
    save_policy(lm, load_tokenizer(src), out, dtype=torch.bfloat16)
    assert weights_dtype(out) == torch.bfloat16
    assert next(lm.parameters()).dtype == torch.float32  # the training copy is untouched


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_saved_policy_has_the_files_and_tensors_save_pretrained_writes(trainer_store, tmp_path, tied, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    src = trainer_store.path(trainer_store.policy)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            tie_word_embeddings=tied,
        )
    )
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    save_policy(lm, load_tokenizer(src), ours, dtype=dtype)
    (copy.deepcopy(lm).to(dtype) if dtype else lm).save_pretrained(theirs)
    load_tokenizer(src).save_pretrained(theirs)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    ours_cfg, theirs_cfg = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    assert ours_cfg == theirs_cfg
    assert tensor_signature(ours) == tensor_signature(theirs)
    a, b = load_file(str(ours / WEIGHTS_FILE)), load_file(str(theirs / WEIGHTS_FILE))
    assert all(torch.equal(a[k], b[k]) for k in b)


# --- LoRA, precision and device settings -----------------------------------------------------------


def test_model_settings_problems_name_each_field():
    assert ModelSettings().problems() == []
    assert not ModelSettings().lora_enabled
    bad = ModelSettings(
        policy_mode="qlora",
        value_model="x",
        precision="fp8",
        lora=LoraSettings(rank=0, alpha=0, dropout=1.0, target_modules=()),
    )
    text = "; ".join(bad.problems())
    for words in ("policy mode 'qlora'", "value model 'x'", "precision 'fp8'"):
        assert words in text
    assert "LoRA" not in text  # the adapter's shape matters only in LoRA mode
    lora = "; ".join(dataclasses.replace(bad, policy_mode="lora").problems())
    for words in ("rank must be at least 1", "alpha must be positive", "dropout must be in", "target modules"):
        assert words in lora


def test_attach_lora_starts_as_the_base_and_saves_only_the_adapter(trainer_store, tmp_path, one_thread):
    policy_dir = trainer_store.path(trainer_store.policy)
    base = load_policy(policy_dir)
    ids = torch.tensor([PROMPTS[0] + RESPONSES[0]])
    with torch.no_grad():
        want = base(input_ids=ids).logits.clone()
    peft_model = attach_lora(base, LoraSettings(rank=2, alpha=4.0, target_modules=("q_proj", "down_proj")))
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, want)  # B = 0: exactly the base
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    info = lora_info(peft_model, trainer_store.policy)
    assert (info.rank, info.alpha, info.target_modules) == (2, 4.0, ("down_proj", "q_proj"))
    out = save_adapter(peft_model, tmp_path / "adapter", trainer_store.policy)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == trainer_store.policy  # not a local path
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (2, 4.0, "LORA")
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        load_adapter(load_policy(policy_dir), tmp_path, trainable=False)


def test_attach_lora_refuses_a_module_the_model_does_not_have(trainer_store):
    base = load_policy(trainer_store.path(trainer_store.policy))
    with pytest.raises(ValueError, match="no_such_proj"):
        attach_lora(base, LoraSettings(target_modules=("no_such_proj",)))


def test_policy_value_head_holds_no_copy_and_no_policy_parameter(trainer_store, one_thread):
    lm = load_policy(trainer_store.path(trainer_store.policy))
    value = PolicyValueHead(lm, lm.config.hidden_size)
    assert {n for n, _ in value.named_parameters()} == {"head.weight", "head.bias"}
    tokenizer = load_tokenizer(trainer_store.path(trainer_store.policy))
    batch = _batch(tokenizer, PROMPTS, RESPONSES)
    with torch.no_grad():
        value.head.bias.fill_(0.25)
    out = value(batch.input_ids, batch.attention_mask, batch.response_positions)
    assert out.shape == batch.response_ids.shape and torch.all(out == 0.25)
    out.sum().backward()
    assert value.head.weight.grad is not None
    assert all(p.grad is None for p in lm.parameters())  # the features are detached
