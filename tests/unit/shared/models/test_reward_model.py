"""The reward model (shared/models/reward_model.py) on a tiny backbone: what gets gradients, save/load
through the store, refusing corrupt checkpoints, padding. Its trainer is tested in
tests/unit/services/reward/test_training.py, its input encoding in test_encoding.py."""

import json

import pytest
import torch

from services.reward.losses import kwise_ranking_loss
from shared.events import Message
from shared.model_store import PICKLE_SUFFIXES, CorruptVersionError
from shared.models.encoding import EncodingLimits, encode_rm_input, pad_batch
from shared.models.reward_model import HEAD_NAME, WEIGHTS_NAME, RewardModel, RewardModelError, load_version

Q = (Message("user", "What is 2 plus 3?"),)


def batch(tok, responses, limits=EncodingLimits(64, 32)):
    seqs = [encode_rm_input(tok, Q, r, limits).input_ids for r in responses]
    return pad_batch(seqs, tok.pad_token_id)


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
    with pytest.raises(CorruptVersionError, match="model.safetensors does not match its blake3 digest"):
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
