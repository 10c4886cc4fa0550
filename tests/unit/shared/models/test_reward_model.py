"""The reward model on a tiny backbone: what gets gradients, save/load through the store, refusing
corrupt checkpoints, padding, and the truncation rule."""

import json

import pytest
import torch

from services.reward.comparisons import ComparisonGroup, PointwiseExample, Sample
from services.reward.losses import kwise_ranking_loss
from services.reward.training import RewardTrainer, TrainSettings
from shared.events import Message
from shared.model_store import PICKLE_SUFFIXES, CorruptVersionError
from shared.models.encoding import EncodingLimits, encode_rm_input, pad_batch, truncate
from shared.models.reward_model import HEAD_NAME, WEIGHTS_NAME, RewardModel, RewardModelError, load_version

Q = (Message("user", "What is 2 plus 3?"),)


def batch(tok, responses, limits=EncodingLimits(64, 32)):
    seqs = [encode_rm_input(tok, Q, r, limits).input_ids for r in responses]
    return pad_batch(seqs, tok.pad_token_id)


@pytest.fixture()
def rm(tiny_policy_dir):
    torch.manual_seed(0)
    return RewardModel.from_policy_dir(tiny_policy_dir)


def test_backbone_has_no_unembedding_and_the_head_is_scalar(rm):
    names = [n for n, _ in rm.named_parameters()]
    assert not any("lm_head" in n for n in names)
    assert rm.score_head.out_features == 1 and rm.score_head.in_features == 16
    assert rm.score_head.bias.item() == 0.0
    assert "offset" not in names and "offset" in rm.state_dict()


def test_kwise_loss_sends_gradients_into_backbone_and_head_never_into_the_offset(rm, tiny_tokenizer):
    ids, mask = batch(tiny_tokenizer, ["2 plus 3 is 5.", "2 plus 3 is 6.", "I am not sure, sorry."])
    kwise_ranking_loss(rm(ids, mask)).backward()
    for name, p in rm.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
    assert rm.score_head.weight.grad.abs().sum() > 0
    assert rm.backbone.embed_tokens.weight.grad.abs().sum() > 0
    assert not rm.offset.requires_grad and rm.offset.grad is None


def test_frozen_backbone_trains_the_head_only(rm, tiny_tokenizer):
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    offset_before = rm.offset.clone()
    trainer = RewardTrainer(
        rm, tiny_tokenizer, TrainSettings(lr=1e-2, freeze_backbone=True, limits=EncodingLimits(64, 32))
    )
    group = ComparisonGroup((Sample(Q, "2 plus 3 is 5."), Sample(Q, "I am not sure.")), ((0, 1),), "offline")
    trainer.step([group, PointwiseExample(Sample(Q, "Hello there."), 1.0)])
    for name, p in rm.named_parameters():
        changed = not torch.equal(p, before[name])
        if name.startswith("backbone."):
            assert p.grad is None and not changed, f"frozen {name} changed"
        else:
            assert changed, f"{name} did not train"
    assert torch.equal(rm.offset, offset_before)


def test_full_training_step_moves_backbone_and_head_not_offset(rm, tiny_tokenizer):
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    trainer = RewardTrainer(rm, tiny_tokenizer, TrainSettings(lr=1e-2, limits=EncodingLimits(64, 32)))
    group = ComparisonGroup((Sample(Q, "2 plus 3 is 5."), Sample(Q, "I am not sure.")), ((0, 1),), "offline")
    trainer.step([group])
    assert not torch.equal(rm.backbone.layers[0].mlp.up_proj.weight, before["backbone.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(rm.score_head.weight, before["score_head.weight"])
    assert rm.offset.item() == 0.0


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(rm, tiny_tokenizer):
    rm.eval()
    responses = ["5.", "2 plus 3 is 5, I think, and that is all I can say."]
    with torch.no_grad():
        together = rm(*batch(tiny_tokenizer, responses))
        alone = torch.cat([rm(*batch(tiny_tokenizer, [r])) for r in responses])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_offset_shifts_every_score(rm, tiny_tokenizer):
    rm.eval()
    ids, mask = batch(tiny_tokenizer, ["a", "b"])
    with torch.no_grad():
        raw = rm(ids, mask)
        rm.set_offset(1.5, "test")
        torch.testing.assert_close(rm(ids, mask), raw - 1.5)
        torch.testing.assert_close(rm.raw_scores(ids, mask), raw)


def test_save_publish_verify_load_roundtrip_gives_the_same_scores(rm, tiny_tokenizer, tiny_store, tmp_path):
    rm.eval()
    rm.set_offset(0.25, "unit test")
    ids, mask = batch(tiny_tokenizer, ["2 plus 3 is 5.", "no idea"])
    with torch.no_grad():
        expected = rm(ids, mask)
    rm.save(tmp_path / "rm", tiny_tokenizer)
    files = {p.name for p in (tmp_path / "rm").iterdir()}
    assert {"config.json", WEIGHTS_NAME, HEAD_NAME, "tokenizer.json"} <= files
    assert not any(p.suffix in PICKLE_SUFFIXES for p in (tmp_path / "rm").iterdir())
    head = json.loads((tmp_path / "rm" / HEAD_NAME).read_text())
    assert head["offset"] == 0.25 and head["pooling"] == "last_token" and head["offset_reference"] == "unit test"
    version = tiny_store.publish("rm", tmp_path / "rm", parent="policy-0001").version
    assert version == "rm-0001"
    loaded = load_version(tiny_store, version)
    assert loaded.version == "rm-0001" and loaded.parent == "policy-0001"
    assert loaded.model.info["offset_reference"] == "unit test"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids, mask), expected)


def test_a_corrupt_checkpoint_is_refused_before_loading(rm, tiny_tokenizer, tiny_store, tmp_path):
    rm.save(tmp_path / "rm", tiny_tokenizer)
    version = tiny_store.publish("rm", tmp_path / "rm").version
    weights = tiny_store.path(version) / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match="model.safetensors does not match its sha256"):
        load_version(tiny_store, version)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / HEAD_NAME).unlink(), "reward_head.json is missing"),
        (lambda d: (d / HEAD_NAME).write_text('{"format": 1, "pooling": "mean", "padding_side": "right"}'), "pooling"),
        (lambda d: (d / WEIGHTS_NAME).write_bytes(b"not safetensors"), "unreadable model.safetensors"),
    ],
)
def test_a_directory_that_is_not_a_reward_model_is_refused(rm, tiny_tokenizer, tmp_path, damage, message):
    rm.save(tmp_path / "rm", tiny_tokenizer)
    damage(tmp_path / "rm")
    with pytest.raises(RewardModelError, match=message):
        RewardModel.load(tmp_path / "rm")


def test_a_policy_checkpoint_is_not_a_reward_model(tiny_policy_dir):
    with pytest.raises(RewardModelError, match="reward_head.json is missing"):
        RewardModel.load(tiny_policy_dir)


# --- truncation --------------------------------------------------------------------------------

BOS, EOS = 0, 9


@pytest.mark.parametrize(
    "prompt, response, limits, expected, cut",
    [
        # fits: unchanged
        ([BOS, 1, 2], [5, 6, EOS], EncodingLimits(8, 4), [BOS, 1, 2, 5, 6, EOS], False),
        # long response: first max_response_tokens - 1 tokens, then EOS
        ([BOS, 1], [5, 6, 7, 8, 4, EOS], EncodingLimits(8, 4), [BOS, 1, 5, 6, 7, EOS], True),
        # long prompt: BOS kept, then its last tokens; the response is whole
        ([BOS, 1, 2, 3, 4, 5, 6], [7, EOS], EncodingLimits(5, 3), [BOS, 5, 6, 7, EOS], True),
        # both
        ([BOS, 1, 2, 3, 4, 5], [6, 7, 8, EOS], EncodingLimits(5, 3), [BOS, 5, 6, 7, EOS], True),
        # a prompt without BOS keeps only its last tokens
        ([1, 2, 3, 4], [7, EOS], EncodingLimits(4, 2), [3, 4, 7, EOS], True),
    ],
)
def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_the_response(prompt, response, limits, expected, cut):
    enc = truncate(prompt, response, limits, bos_token_id=BOS, eos_token_id=EOS)
    assert enc.input_ids == expected and enc.truncated is cut
    assert len(enc.input_ids) <= limits.max_tokens


def test_encoding_uses_the_chat_template_and_ends_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_rm_input(tok, Q, "2 plus 3 is 5.", EncodingLimits(64, 32))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert enc.input_ids[: enc.prompt_tokens] == list(prompt)
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids[enc.prompt_tokens : -1]) == "2 plus 3 is 5."
    # "<|end|>" typed into a response is text, not the end-of-turn token.
    sneaky = encode_rm_input(tok, Q, "5<|end|>", EncodingLimits(64, 32)).input_ids
    assert sneaky.count(tok.eos_token_id) == 2  # the user turn's end and the final EOS only


def test_long_inputs_are_truncated_to_the_limits(tiny_tokenizer):
    limits = EncodingLimits(40, 12)
    long_prompt = (Message("user", "Hello there, how are you today? " * 20),)
    enc = encode_rm_input(tiny_tokenizer, long_prompt, "I am not sure, sorry. " * 10, limits)
    assert enc.truncated and len(enc.input_ids) == 40
    assert len(enc.input_ids) - enc.prompt_tokens == 12
    assert enc.input_ids[0] == tiny_tokenizer.bos_token_id and enc.input_ids[-1] == tiny_tokenizer.eos_token_id
    assistant = tiny_tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert assistant in enc.input_ids[: enc.prompt_tokens], "the latest turn's assistant marker survives"
