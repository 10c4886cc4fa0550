"""The RM losses on hand-computed values (softplus(-d) = -log σ(d))."""

import math

import pytest
import torch

from services.reward.losses import (
    batched_group_loss,
    batched_kwise_ranking_loss,
    group_loss,
    kwise_ranking_loss,
    normalisation_offset,
    pairwise_accuracy,
    pairwise_logistic_loss,
    pointwise_thumb_loss,
    preference_batch_loss,
)

# -log σ(d) = log(1 + e^-d), by hand:
NLS = {1: 0.31326169, 2: 0.12692801, 3: 0.04858735, -1: 1.31326169, 0: math.log(2), -2: 2.12692801}


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_pairwise_term_is_minus_log_sigmoid_of_the_difference():
    assert pairwise_logistic_loss(t(2.0), t(0.0)).item() == pytest.approx(NLS[2], abs=1e-7)
    assert pairwise_logistic_loss(t(0.5), t(1.5)).item() == pytest.approx(NLS[-1], abs=1e-7)
    assert pairwise_logistic_loss(t(2.0, 1.0), t(0.0, 0.0)).item() == pytest.approx((NLS[2] + NLS[1]) / 2, abs=1e-7)


def test_kwise_loss_of_a_3_ranking_is_the_mean_of_its_3_pairwise_terms():
    # Best first: rewards 3, 1, 0 -> pairs (3,1) d=2, (3,0) d=3, (1,0) d=1.
    r = t(3.0, 1.0, 0.0)
    expected = (NLS[2] + NLS[3] + NLS[1]) / 3
    assert expected == pytest.approx(0.1629257, abs=1e-6)
    assert kwise_ranking_loss(r).item() == pytest.approx(expected, abs=1e-7)
    pairwise = [pairwise_logistic_loss(r[i : i + 1], r[j : j + 1]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert kwise_ranking_loss(r).item() == pytest.approx(torch.stack(pairwise).mean().item(), abs=1e-12)


def test_a_ranking_in_the_wrong_order_costs_more():
    assert kwise_ranking_loss(t(0.0, 1.0, 3.0)) > kwise_ranking_loss(t(3.0, 1.0, 0.0))


def test_batch_of_rankings_weighs_each_ranking_equally_not_each_pair():
    # A 3-ranking (3 pairs, mean 0.1629257) and a misordered 2-ranking (1 pair, d=-1).
    loss = batched_kwise_ranking_loss([t(3.0, 1.0, 0.0), t(0.0, 1.0)]).item()
    assert loss == pytest.approx((0.1629257 + NLS[-1]) / 2, abs=1e-6)
    per_pair = (NLS[2] + NLS[3] + NLS[1] + NLS[-1]) / 4
    assert loss != pytest.approx(per_pair, abs=1e-3)


def test_grouped_and_batched_forms_agree():
    rewards = t(3.0, 1.0, 0.0, 0.0, 1.0)
    groups = [([0, 1, 2], [(0, 1), (0, 2), (1, 2)]), ([3, 4], [(0, 1)])]
    expected = batched_kwise_ranking_loss([t(3.0, 1.0, 0.0), t(0.0, 1.0)]).item()
    assert batched_group_loss(rewards, groups).item() == pytest.approx(expected, abs=1e-12)
    assert preference_batch_loss(rewards, groups).item() == pytest.approx(expected, abs=1e-12)
    # A group's pairs need not be a full ranking: thumbs give "every up beats every down".
    assert group_loss(t(1.0, 0.0, 2.0), [(0, 1), (2, 1)]).item() == pytest.approx((NLS[1] + NLS[2]) / 2, abs=1e-7)


def test_pointwise_thumb_is_logistic_against_sigmoid_of_the_reward():
    assert pointwise_thumb_loss(t(0.0), 1.0).item() == pytest.approx(math.log(2))
    assert pointwise_thumb_loss(t(2.0), 1.0).item() == pytest.approx(NLS[2], abs=1e-7)
    assert pointwise_thumb_loss(t(2.0), 0.0).item() == pytest.approx(NLS[-2], abs=1e-7)
    assert pointwise_thumb_loss(t(2.0, -2.0), t(1.0, 0.0)).item() == pytest.approx(NLS[2], abs=1e-7)


def test_a_pointwise_thumb_is_one_batch_element_beside_the_groups():
    rewards = t(3.0, 1.0, 0.0, 2.0)
    groups = [([0, 1, 2], [(0, 1), (0, 2), (1, 2)])]
    loss = preference_batch_loss(rewards, groups, pointwise=[(3, 0.0)], pointwise_weight=0.5).item()
    assert loss == pytest.approx((0.1629257 + 0.5 * NLS[-2]) / 2, abs=1e-6)


def test_normalisation_offset_centres_the_reference_rewards():
    raw = t(1.0, 2.0, 3.0, 6.0)
    offset = normalisation_offset(raw)
    assert offset == 3.0
    assert (raw - offset).mean().item() == pytest.approx(0.0)


def test_pairwise_accuracy_counts_strict_wins():
    rewards = t(3.0, 1.0, 1.0, 0.0, 5.0)
    groups = [([0, 1, 2], [(0, 1), (0, 2), (1, 2)]), ([3, 4], [(0, 1)])]
    assert pairwise_accuracy(rewards, groups) == (2, 4)  # a tie (1.0 vs 1.0) and 0 < 5 are wrong


@pytest.mark.parametrize(
    "call",
    [
        lambda: pairwise_logistic_loss(t(), t()),
        lambda: pairwise_logistic_loss(t(1.0, 2.0), t(1.0)),
        lambda: kwise_ranking_loss(t(1.0)),
        lambda: batched_kwise_ranking_loss([]),
        lambda: group_loss(t(1.0, 2.0), []),
        lambda: preference_batch_loss(t(1.0), []),
        lambda: normalisation_offset([]),
    ],
)
def test_degenerate_inputs_are_refused(call):
    with pytest.raises(ValueError):
        call()
