"""Collation of rollouts into padded tensors: right padding, EOS cut, response positions and masks."""

from __future__ import annotations

import pytest
import torch

from services.trainer.rollout_batch import InvalidRollout, Rollout, collate_rollouts, cut_at_eos
from shared.errors import InvalidArgument

PAD, EOS = 0, 9


def rollout(prompt, response, logprobs=None, score=1.0, version="policy-0001"):
    return Rollout(
        messages=[],
        prompt_token_ids=prompt,
        response_token_ids=response,
        behaviour_logprobs=logprobs,
        policy_version=version,
        finish_reason="stop",
        score=score,
    )


def test_collate_pads_right_cuts_after_eos_and_points_at_the_predicting_positions():
    batch = collate_rollouts(
        [
            rollout([5, 6, 7], [11, 12, EOS, 13, 14], logprobs=[-1.0, -2.0, -3.0, -4.0, -5.0], score=0.5),
            rollout([5], [21, 22], score=-1.0),  # no EOS: cut at the length limit
        ],
        PAD,
        EOS,
    )
    assert batch.input_ids.tolist() == [[5, 6, 7, 11, 12, EOS], [5, 21, 22, PAD, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert batch.response_ids.tolist() == [[11, 12, EOS], [21, 22, PAD]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    # The output at position p predicts token p + 1: response token j of a prompt of n tokens is
    # predicted at n - 1 + j; padding columns repeat a valid position.
    assert batch.response_positions.tolist() == [[2, 3, 4], [0, 1, 1]]
    for b in range(2):
        for j in range(int(batch.response_mask[b].sum())):
            assert batch.input_ids[b, batch.response_positions[b, j] + 1] == batch.response_ids[b, j]
    assert batch.behaviour_logprobs.tolist() == [[-1.0, -2.0, -3.0], [0.0, 0.0, 0.0]]
    assert batch.has_behaviour_logprobs.tolist() == [True, False]
    assert batch.ended_with_eos.tolist() == [True, False]
    assert batch.scores.tolist() == [0.5, -1.0]


def test_select_keeps_rows():
    batch = collate_rollouts([rollout([1], [2, EOS]), rollout([1, 2], [3]), rollout([4], [5, 6, EOS])], PAD, EOS)
    sub = batch.select([2, 0])
    assert sub.size == 2
    assert sub.response_ids.tolist() == [[5, 6, EOS], [2, EOS, PAD]]


def test_cut_at_eos():
    assert cut_at_eos([1, EOS, 2, EOS], EOS) == [1, EOS]
    assert cut_at_eos([1, 2], EOS) == [1, 2]
    assert cut_at_eos([1, EOS], None) == [1, EOS]


@pytest.mark.parametrize(
    "bad, field",
    [
        (rollout([], [1]), "prompt_token_ids"),
        (rollout([1], []), "response_token_ids"),
        (rollout([1], [2, 3], logprobs=[-1.0]), "behaviour_logprobs"),
        (rollout([1], [2], score=float("nan")), "score"),
        (rollout([1], [2], score=float("inf")), "score"),
    ],
)
def test_invalid_rollouts_are_refused_naming_the_field(bad, field):
    with pytest.raises(InvalidRollout, match=field) as info:
        collate_rollouts([rollout([1], [2]), bad], PAD, EOS)
    assert "rollout 1" in str(info.value)
    assert isinstance(info.value, InvalidArgument)  # -> gRPC INVALID_ARGUMENT through the interceptor


def test_collate_refuses_an_empty_batch():
    with pytest.raises(InvalidRollout):
        collate_rollouts([], PAD, EOS)


def test_response_of_only_eos_is_one_token():
    batch = collate_rollouts([rollout([1, 2], [EOS, 7])], PAD, EOS)
    assert batch.response_mask.tolist() == [[1.0]]
    assert batch.response_ids.dtype == torch.long
