"""The reward model's losses, as small pure functions of reward tensors.

InstructGPT (Ouyang et al. 2022, eq. 1) trains the RM on rankings of K responses with

    loss(θ) = −1/C(K,2) · E_{(x, y_w, y_l) ~ D} [ log σ(r_θ(x, y_w) − r_θ(x, y_l)) ]

and puts all C(K,2) pairs of one ranking into one batch element: each ranking is one example whose
loss is the *mean* of its pairwise terms, so a 9-way ranking (36 pairs) weighs as much as a single
pairwise choice and the RM does not overfit the many correlated pairs of one prompt.

Every preference this project learns from is such a group: a ranking (all pairs), a pairwise
choice (one pair), or the pairs between differently rated responses of one prompt (thumbs,
Likert; see comparisons.py). A lone thumb adds a pointwise logistic term instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from services.reward.comparisons import ranking_pairs


def pairwise_logistic_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """Mean of −log σ(r_w − r_l) over the given pairs (Bradley-Terry negative log-likelihood)."""
    if r_w.shape != r_l.shape or r_w.numel() == 0:
        raise ValueError(f"need two equal, non-empty shapes; got {tuple(r_w.shape)} and {tuple(r_l.shape)}")
    return -F.logsigmoid(r_w - r_l).mean()


def group_loss(rewards: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Mean over ``pairs`` of −log σ(r[w] − r[l]): one group (one batch element) of comparisons."""
    if not pairs:
        raise ValueError("a comparison group needs at least one pair")
    w = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=rewards.device)
    lo = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=rewards.device)
    return pairwise_logistic_loss(rewards[w], rewards[lo])


def kwise_ranking_loss(rewards_best_first: torch.Tensor) -> torch.Tensor:
    """InstructGPT's loss for one ranking: the mean of −log σ(r_w − r_l) over its C(K,2) pairs."""
    k = rewards_best_first.shape[0]
    if rewards_best_first.dim() != 1 or k < 2:
        raise ValueError(
            f"a ranking needs a 1-d tensor of at least 2 rewards, got shape {tuple(rewards_best_first.shape)}"
        )
    return group_loss(rewards_best_first, ranking_pairs(k))


def batched_group_loss(
    rewards: torch.Tensor, groups: Sequence[tuple[Sequence[int], Sequence[tuple[int, int]]]]
) -> torch.Tensor:
    """Mean over groups of each group's mean pairwise term.

    ``rewards`` holds the scores of every response in the batch; each group is (the indices of its
    responses in ``rewards``, its (winner, loser) pairs as positions within that index list). So
    every pair of a K-way ranking weighs 1/C(K,2) of one ranking, and every ranking weighs the same.
    """
    if not groups:
        raise ValueError("no groups")
    losses = []
    for members, pairs in groups:
        idx = torch.tensor(list(members), dtype=torch.long, device=rewards.device)
        losses.append(group_loss(rewards[idx], pairs))
    return torch.stack(losses).mean()


def batched_kwise_ranking_loss(rankings: Sequence[torch.Tensor]) -> torch.Tensor:
    """InstructGPT's loss over a batch of rankings (each best first): mean of the per-ranking losses."""
    if not rankings:
        raise ValueError("no rankings")
    return torch.stack([kwise_ranking_loss(r) for r in rankings]).mean()


def pointwise_thumb_loss(r: torch.Tensor, label: torch.Tensor | float) -> torch.Tensor:
    """Logistic loss of a lone thumb: label 1 (up) or 0 (down) against σ(r); mean over the batch.

    −[y log σ(r) + (1 − y) log(1 − σ(r))]: it anchors the reward's sign (up > 0 > down), which
    pairwise terms alone leave free.
    """
    label = torch.as_tensor(label, dtype=r.dtype, device=r.device).expand_as(r)
    if r.numel() == 0:
        raise ValueError("no pointwise examples")
    return F.binary_cross_entropy_with_logits(r, label)


def preference_batch_loss(
    rewards: torch.Tensor,
    groups: Sequence[tuple[Sequence[int], Sequence[tuple[int, int]]]],
    pointwise: Sequence[tuple[int, float]] = (),
    pointwise_weight: float = 1.0,
) -> torch.Tensor:
    """The learner's loss over one batch of ratings: every rating is one batch element.

    A comparison group contributes the mean of its pairwise terms (as in ``batched_group_loss``), a
    pointwise example (index into ``rewards``, label) ``pointwise_weight`` times its logistic term;
    the batch loss is the mean over all elements. With groups only, this equals
    ``batched_group_loss``; with rankings only, ``batched_kwise_ranking_loss``.
    """
    terms = []
    for members, pairs in groups:
        idx = torch.tensor(list(members), dtype=torch.long, device=rewards.device)
        terms.append(group_loss(rewards[idx], pairs))
    for i, label in pointwise:
        terms.append(pointwise_weight * pointwise_thumb_loss(rewards[i : i + 1], label))
    if not terms:
        raise ValueError("an empty batch")
    return torch.stack(terms).mean()


def normalisation_offset(reference_rewards: torch.Tensor | Sequence[float]) -> float:
    """The offset that makes the reference responses score 0 on average: their mean raw reward."""
    t = torch.as_tensor(reference_rewards, dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError("no reference rewards")
    return float(t.mean())


def pairwise_accuracy(
    rewards: torch.Tensor, groups: Sequence[tuple[Sequence[int], Sequence[tuple[int, int]]]]
) -> tuple[int, int]:
    """(pairs whose winner scores strictly higher, all pairs) over the groups; as in batched_group_loss."""
    right = total = 0
    for members, pairs in groups:
        for w, lo in pairs:
            right += int(rewards[members[w]] > rewards[members[lo]])
            total += 1
    return right, total
