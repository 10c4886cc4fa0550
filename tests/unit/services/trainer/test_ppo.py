"""The PPO maths (services/trainer/ppo.py) against hand-computed values and independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.trainer.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae_advantages,
    importance_weighted_kl,
    kl_penalty,
    last_token_index,
    lm_loss,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    rewards_with_kl,
)


def assert_close(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- masked statistics ---------------------------------------------------------------------------


def test_masked_mean_and_var_ignore_masked_values():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    kept = np.array([1.0, 2.0, 3.0, 4.0])
    assert masked_mean(values, mask).item() == pytest.approx(kept.mean())
    assert masked_var(values, mask).item() == pytest.approx(kept.var(ddof=1))
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(kept.var())
    assert masked_mean(values, mask, axis=1).tolist() == pytest.approx([1.5, 3.5])


def test_masked_whiten_gives_zero_mean_unit_variance_on_the_mask():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(4, 7, generator=gen) * 3 + 5
    mask = (torch.rand(4, 7, generator=gen) > 0.3).float()
    white = masked_whiten(values, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(white, mask).item() == pytest.approx(1.0, rel=1e-4)
    kept_mean = masked_mean(values, mask)
    scaled = masked_whiten(values, mask, shift_mean=False)
    assert masked_mean(scaled, mask).item() == pytest.approx(kept_mean.item(), rel=1e-5)


def test_masked_var_refuses_a_single_value():
    with pytest.raises(ValueError):
        masked_var(torch.tensor([1.0, 2.0]), torch.tensor([1, 0]))


# --- logprobs, entropy, KL ---------------------------------------------------------------------


def test_logprobs_and_entropy_match_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 3), generator=gen)
    dist = torch.distributions.Categorical(logits=logits)
    assert torch.allclose(logprobs_from_logits(logits, labels), dist.log_prob(labels), atol=1e-6)
    assert torch.allclose(entropy_from_logits(logits), dist.entropy(), atol=1e-5)


def test_kl_estimators_are_unbiased_and_k3_is_never_negative():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    exact = float((p * (p / q).log()).sum())
    gen = torch.Generator().manual_seed(2)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, logq = p.log()[samples], q.log()[samples]
    k1, k3 = kl_penalty(logp, logq, "k1"), kl_penalty(logp, logq, "k3")
    assert k1.mean().item() == pytest.approx(exact, abs=0.01)
    assert k3.mean().item() == pytest.approx(exact, abs=0.01)
    assert (k3 >= 0).all() and (k1 < 0).any()
    assert kl_penalty(logp, logp, "k3").abs().max().item() == 0.0
    with pytest.raises(ValueError):
        kl_penalty(logp, logq, "k2")


# --- per-token rewards: penalty placement --------------------------------------------------------


def test_score_goes_to_the_last_real_token_and_kl_to_every_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -0.2, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1: two tokens, then padding
    score = torch.tensor([2.0, 3.0])
    beta = 0.1
    rewards, kl = per_token_rewards(score, logprobs, ref, mask, beta)
    assert_close(kl, [[0.5, -1.0, 0.0], [-0.2, -0.5, 0.0]])
    assert_close(rewards, [[-0.05, 0.1, 2.0], [0.02, 0.05 + 3.0, 0.0]])
    # Without KL the only non-zero reward of each row is its score, at its last token.
    rewards, _ = per_token_rewards(score, logprobs, ref, mask, 0.0)
    assert_close(rewards, [[0.0, 0.0, 2.0], [0.0, 3.0, 0.0]])


def test_last_token_index_and_empty_rows():
    assert last_token_index(torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])).tolist() == [1, 0, 2]
    with pytest.raises(ValueError):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


# --- GAE -------------------------------------------------------------------------------------------


def test_gae_matches_a_hand_computed_trajectory():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.1, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    # Row 0: deltas 0.9*0.4-0.5 = -0.14, 0.9*0.3-0.4 = -0.13, 1-0.3 = 0.7 (the episode ends: next value 0)
    #        A2 = 0.7, A1 = -0.13 + 0.72*0.7 = 0.374, A0 = -0.14 + 0.72*0.374 = 0.12928
    # Row 1: the padding's reward 5 and value 9 must not leak in: A1 = 1 - 0.2 = 0.8,
    #        A0 = 0.2 + 0.9*0.2 - 0.1 + 0.72*0.8 = 0.856
    assert_close(adv, [[0.12928, 0.374, 0.7], [0.856, 0.8, 0.0]])
    assert_close(ret, [[0.62928, 0.774, 1.0], [0.956, 1.0, 0.0]])


def test_gae_equals_a_per_episode_loop_on_random_data():
    gen = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(5, 9, generator=gen), torch.randn(5, 9, generator=gen)
    lengths = [9, 1, 4, 7, 2]
    mask = torch.tensor([[1.0] * n + [0.0] * (9 - n) for n in lengths])
    adv, ret = gae_advantages(rewards, values, mask, 0.97, 0.9)
    for b, n in enumerate(lengths):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist() + [0.0]
        running, expected = 0.0, [0.0] * n
        for t in reversed(range(n)):
            running = r[t] + 0.97 * v[t + 1] - v[t] + 0.97 * 0.9 * running
            expected[t] = running
        assert adv[b, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert ret[b, :n].tolist() == pytest.approx([a + x for a, x in zip(expected, v)], abs=1e-5)
        assert adv[b, n:].abs().sum() == 0 and ret[b, n:].abs().sum() == 0


def test_gae_with_lambda_one_is_the_monte_carlo_return():
    rewards = torch.tensor([[0.1, -0.2, 1.5]])
    values = torch.tensor([[0.3, 0.7, -0.4]])
    _, ret = gae_advantages(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert_close(ret, [[1.4, 1.3, 1.5]])


# --- clipped losses: values and gradients ----------------------------------------------------------


def _policy_grad(new: float, advantage: float, clip: float = 0.2) -> tuple[float, float, float]:
    new_lp = torch.tensor([[math.log(new), 0.0]], requires_grad=True)
    old_lp = torch.zeros(1, 2)
    adv = torch.tensor([[advantage, 123.0]])
    mask = torch.tensor([[1.0, 0.0]])  # the second token is padding: no loss, no gradient
    loss, clipfrac, _ = clipped_policy_loss(new_lp, old_lp, adv, mask, clip)
    loss.backward()
    assert new_lp.grad[0, 1] == 0
    return loss.item(), new_lp.grad[0, 0].item(), clipfrac.item()


@pytest.mark.parametrize(
    "ratio, advantage, loss, grad, clipped",
    [
        (1.1, 1.0, -1.1, -1.1, 0.0),  # inside the trust region: d(-A*r)/dlogp = -A*r
        (1.5, 1.0, -1.2, 0.0, 1.0),  # positive advantage, ratio above 1+eps: clipped, no gradient
        (1.5, -1.0, 1.5, 1.5, 0.0),  # negative advantage, ratio above: the pessimistic unclipped term
        (0.5, -1.0, 0.8, 0.0, 1.0),  # negative advantage, ratio below 1-eps: clipped
        (0.5, 1.0, -0.5, -0.5, 0.0),  # positive advantage, ratio below: unclipped
    ],
)
def test_clipped_policy_loss_value_and_gradient(ratio, advantage, loss, grad, clipped):
    got_loss, got_grad, got_clip = _policy_grad(ratio, advantage)
    assert got_loss == pytest.approx(loss)
    assert got_grad == pytest.approx(grad, abs=1e-6)
    assert got_clip == clipped


def test_clipped_policy_loss_approx_kl_is_zero_on_policy_and_positive_off():
    lp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    _, _, kl0 = clipped_policy_loss(lp, lp, torch.ones(1, 2), mask, 0.2)
    _, _, kl1 = clipped_policy_loss(lp + 0.3, lp, torch.ones(1, 2), mask, 0.2)
    assert kl0.item() == 0.0
    assert kl1.item() == pytest.approx(math.exp(0.3) - 1 - 0.3)


@pytest.mark.parametrize(
    "new, loss, grad",
    [
        (0.5, 0.5 * 0.64, 0.0),  # moved 0.5 from old 0 towards return 1: clipped at 0.2, the larger loss wins
        (-0.5, 0.5 * 2.25, -1.5),  # moved away from the return: unclipped (larger) term, gradient V - R
        (0.1, 0.5 * 0.81, -0.9),  # inside the clip range
    ],
)
def test_clipped_value_loss_value_and_gradient(new, loss, grad):
    values = torch.tensor([[new, 7.0]], requires_grad=True)
    got, clipfrac = clipped_value_loss(
        values, torch.zeros(1, 2), torch.tensor([[1.0, -3.0]]), torch.tensor([[1.0, 0.0]]), 0.2
    )
    got.backward()
    assert got.item() == pytest.approx(loss)
    assert values.grad[0, 0].item() == pytest.approx(grad, abs=1e-6)
    assert values.grad[0, 1].item() == 0.0
    assert clipfrac.item() == (1.0 if new == 0.5 else 0.0)


def test_lm_loss_is_the_masked_cross_entropy():
    gen = torch.Generator().manual_seed(4)
    logits, labels = torch.randn(2, 5, 13, generator=gen), torch.randint(0, 13, (2, 5), generator=gen)
    mask = torch.ones(2, 5)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 13), labels.reshape(-1))
    assert lm_loss(logits, labels, mask).item() == pytest.approx(expected.item(), rel=1e-5)


# --- KL controllers ----------------------------------------------------------------------------------


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(6.0, 256)  # on target: unchanged
    assert ctl.value == pytest.approx(0.1)
    ctl.update(12.0, 256)  # error 1.0 clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    before = ctl.value
    ctl.update(6.6, 1000)  # error 0.1
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 1000 / 10_000))
    before = ctl.value
    ctl.update(0.0, 1000)  # far below: clipped at -0.2, beta shrinks
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 1000 / 10_000))
    ctl.update(float("nan"), 1000)
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 1000 / 10_000))


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 10_000)
    assert ctl.value == 0.05


def test_the_kl_penalty_is_the_learners_even_when_the_behaviour_policy_is_the_reference():
    # One token sampled by mu = pi_ref with probability 0.2; the learner's weights moved to 0.4.
    ref = torch.log(torch.tensor([[0.2]]))
    learner = torch.log(torch.tensor([[0.4]]))
    behaviour = ref.clone()
    # Today's penalty (the behaviour policy's KL) is exactly zero: nothing restrains the learner.
    assert kl_penalty(behaviour, ref).item() == 0.0
    # The learner's: w = 0.4 / 0.2 = 2, times log(0.4 / 0.2) = log 2, by hand: 2 log 2.
    kl = importance_weighted_kl(learner, behaviour, ref)
    assert kl.item() == pytest.approx(2 * math.log(2))
    # k3 with the learner's logprobs, same weight: r = 0.2 / 0.4 -> (r - 1) - log r = -0.5 + log 2.
    assert importance_weighted_kl(learner, behaviour, ref, "k3").item() == pytest.approx(2 * (-0.5 + math.log(2)))


def test_the_importance_weighted_kl_is_todays_value_on_policy():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 5, generator=g), -1)
    ref = torch.log_softmax(torch.randn(3, 5, generator=g), -1)
    for estimator in ("k1", "k3"):
        torch.testing.assert_close(importance_weighted_kl(logp, logp, ref, estimator), kl_penalty(logp, ref, estimator))


def test_the_importance_weight_is_truncated():
    ref = torch.log(torch.tensor([[0.01]]))
    kl = importance_weighted_kl(torch.log(torch.tensor([[0.5]])), ref, ref, max_weight=5.0)
    assert kl.item() == pytest.approx(5.0 * math.log(50))


def test_the_importance_weighted_kl_is_unbiased_for_the_learners_kl_at_a_state():
    # Sample tokens from mu, average w * log(pi / pi_ref): the learner's exact KL over the vocabulary.
    pi = torch.tensor([0.5, 0.3, 0.2])
    mu = torch.tensor([0.2, 0.3, 0.5])
    ref = torch.tensor([0.3, 0.3, 0.4])
    exact = float((pi * (pi / ref).log()).sum())
    tokens = torch.multinomial(mu, 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    estimate = importance_weighted_kl(pi.log()[tokens], mu.log()[tokens], ref.log()[tokens], max_weight=100.0)
    assert float(estimate.mean()) == pytest.approx(exact, abs=0.01)


def test_rewards_with_kl_matches_per_token_rewards():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.5, 0.25, 9.0]])
    rewards, masked = rewards_with_kl(torch.tensor([2.0]), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(masked, torch.tensor([[0.5, 0.25, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 2.0 - 0.025, 0.0]]))
