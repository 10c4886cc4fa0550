"""The maths of PPO for language models, as small pure tensor functions (no I/O, no models).

Shapes: every per-token tensor is response-aligned, ``(batch, response_len)``: column ``j`` is the
``j``-th generated token of a sample (see rollout_batch.py's collation). ``mask`` is 1.0 on real response
tokens (up to and including the EOS that ended the response) and 0.0 on padding.

Conventions follow TRL's ``masked_mean`` / ``masked_var`` / ``masked_whiten`` and cleanrl's
``ppo.py``; InstructGPT's objective (Ouyang et al. 2022, eq. 2) for a response y to prompt x is

    R(x, y) = r_theta(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x))

which, as in Ziegler et al. 2019 and TRL, is spread over tokens: every response token t gets
``-beta * KL_t`` and the last real token also gets the reward model's score.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ppo_config import KL_ESTIMATORS

# --- masked statistics (TRL semantics) --------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over all elements, or along ``axis``)."""
    mask = mask.to(values.dtype)
    if axis is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(axis) / mask.sum(axis)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` where ``mask`` is 1; Bessel-corrected when ``unbiased`` (as TRL)."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError("unbiased variance needs at least two unmasked values")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale to unit variance (and zero mean when ``shift_mean``) using masked statistics.

    Masked-out entries are transformed too (they are garbage either way); callers keep masking them.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# --- per-token log-probabilities and entropy --------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] for each position: (..., vocab), (...) -> (...)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, labels.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position: (..., vocab) -> (...), in nats."""
    logits = logits.float()
    pd = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(-1)


# --- KL penalty and per-token rewards ---------------------------------------------------------


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probabilities.

    ``k1`` = log pi - log pi_ref (unbiased, can be negative; InstructGPT's and TRL's default);
    ``k3`` = (r - 1) - log r with r = pi_ref / pi (unbiased and never negative, lower variance;
    http://joschu.net/blog/kl-approx.html).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def importance_weighted_kl(
    learner_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k1",
    max_weight: float = 5.0,
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref), the KL of the weights being trained, from tokens
    that another policy mu (the served version that sampled the rollout) chose:

        KL_t(theta) = E_{y ~ pi_theta(.|s_t)} f(y) = E_{y ~ mu(.|s_t)} [ w_t f(y) ],   w_t = pi_theta(y_t|s_t) / mu(y_t|s_t)

    with f the estimator of ``kl_penalty`` evaluated with pi_theta (k1: log pi_theta - log pi_ref).
    The weight corrects for which token was sampled at each visited prefix s_t (the prefixes
    themselves are mu's, as in PPO's clipped ratio). ``w_t`` is truncated at ``max_weight``: a rare
    token that pi_theta now prefers would otherwise give one enormous term (truncation trades a small
    bias for bounded variance). On-policy (mu = pi_theta) every w_t is 1 and this is exactly
    ``kl_penalty(learner_logprobs, ref_logprobs, estimator)``.
    """
    weight = torch.exp(learner_logprobs - behaviour_logprobs).clamp(max=max_weight)
    return weight * kl_penalty(learner_logprobs, ref_logprobs, estimator)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last 1 in each row of a right-padded ``mask``: (batch, T) -> (batch,) long."""
    if (mask.sum(-1) < 1).any():
        raise ValueError("every response needs at least one unmasked token")
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(-1).values


def per_token_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's reward spread over tokens: ``-kl_coef * KL_t`` at every response token and the RM
    ``score`` (batch,) added at the LAST unmasked token of each row only, with KL_t the on-policy
    estimate ``kl_penalty(logprobs, ref_logprobs)``.

    Returns ``(rewards, kl)``, both (batch, T) and zero on padding; ``kl`` is the per-token estimate
    (before the coefficient), for logging and the adaptive controller.
    """
    return rewards_with_kl(score, kl_penalty(logprobs, ref_logprobs, estimator), mask, kl_coef)


def rewards_with_kl(
    score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_token_rewards`` for a per-token KL estimate already computed (e.g. ``importance_weighted_kl``):

    r_t = -kl_coef * KL_t  (+ score at the last response token)
    """
    mask = mask.to(kl.dtype)
    kl = kl * mask
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.clone()
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards, kl


# --- advantages -------------------------------------------------------------------------------


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
        returns = A + V

    The episode ends at the last unmasked token (its next value is 0: the response is complete).
    Returns ``(advantages, returns)``, (batch, T), zero on padding.
    """
    mask = mask.to(values.dtype)
    batch, length = rewards.shape
    next_mask = torch.cat([mask[:, 1:], torch.zeros(batch, 1, dtype=mask.dtype, device=mask.device)], dim=1)
    next_values = torch.cat([values[:, 1:], torch.zeros(batch, 1, dtype=values.dtype, device=values.device)], dim=1)
    deltas = rewards + gamma * next_values * next_mask - values
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(length)):
        running = deltas[:, t] + gamma * lam * next_mask[:, t] * running
        advantages[:, t] = running
    advantages = advantages * mask
    returns = (advantages + values) * mask
    return advantages, returns


# --- losses -----------------------------------------------------------------------------------


def clipped_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a loss to minimise (token-level masked mean):

        ratio = exp(new - old);  loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))

    Returns ``(loss, clipfrac, approx_kl)``; the last two are detached diagnostics: the fraction of
    tokens where clipping was active, and the k3 estimate of KL(old || new)
    (``mean((ratio - 1) - log ratio)``, cleanrl's ``approx_kl``).
    """
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def clipped_value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss (to minimise): ``0.5 * mean(max((V - R)^2, (V_clip - R)^2))`` with
    ``V_clip = old + clip(V - old, -eps_v, +eps_v)``.

    Returns ``(loss, clipfrac)``; ``clipfrac`` (detached) is the fraction of tokens where the clipped
    term was the larger one.
    """
    clipped_values = old_values + torch.clamp(new_values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (new_values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).to(new_values.dtype), mask)
    return loss, clipfrac


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (the PPO-ptx pretraining term): logits (B, T, V) at positions that
    predict ``labels`` (B, T); masked mean over tokens."""
    return masked_mean(-logprobs_from_logits(logits, labels), mask)


# --- KL coefficient controllers ---------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""


class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: steer beta so the per-sample KL tracks ``target``.

        e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)

    ``current_kl`` is the mean over the batch of each sample's summed per-token KL; ``n_steps`` the
    number of samples it was measured on.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("the adaptive KL controller needs target > 0 and horizon > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
