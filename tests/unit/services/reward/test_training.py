"""RewardTrainer (services/reward/training.py) on a tiny backbone: which parameters a step moves."""

import torch

from services.reward.comparisons import ComparisonGroup, PointwiseExample, Sample
from services.reward.training import RewardTrainer, TrainSettings
from shared.events import Message
from shared.models.encoding import EncodingLimits

Q = (Message("user", "What is 2 plus 3?"),)


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
