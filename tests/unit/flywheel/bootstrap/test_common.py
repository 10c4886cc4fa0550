"""What the offline steps share (flywheel/bootstrap/common.py): the loss, perplexity, the learning-rate
schedule, smoothing, one optimiser step."""

from __future__ import annotations

import math

import pytest
import torch

from flywheel.bootstrap.common import (
    IGNORE,
    causal_lm_loss,
    counted_tokens,
    optimiser_step,
    perplexity,
    smooth,
    warmup_cosine_lr,
)


def test_causal_lm_loss_is_the_mean_shifted_cross_entropy_over_counted_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, 3, 4], [IGNORE, IGNORE, 0, IGNORE]])
    # position t predicts label t+1: counted pairs are (0->2), (1->3), (2->4) in row 0 and (1->0) in row 1
    terms = [-torch.log_softmax(logits[0, t], -1)[labels[0, t + 1]] for t in range(3)]
    terms.append(-torch.log_softmax(logits[1, 1], -1)[0])
    expected = torch.stack(terms)
    assert counted_tokens(labels) == 4
    assert torch.allclose(causal_lm_loss(logits, labels), expected.mean())
    assert torch.allclose(causal_lm_loss(logits, labels, reduction="sum"), expected.sum())


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    logits = torch.zeros(3, 6, 7)
    labels = torch.randint(0, 7, (3, 6))
    nll = float(causal_lm_loss(logits, labels, reduction="sum"))
    assert perplexity(nll, counted_tokens(labels)) == pytest.approx(7.0)
    assert math.isnan(perplexity(0.0, 0))


def test_warmup_then_cosine_to_the_floor():
    peak, total, warmup = 1e-3, 100, 10
    lrs = [warmup_cosine_lr(s, total, warmup, peak) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[9] == pytest.approx(peak)
    assert lrs[10] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[total] == pytest.approx(0.1 * peak)
    assert warmup_cosine_lr(55, total, warmup, peak) == pytest.approx(0.1 * peak + 0.9 * peak * 0.5)


def test_smooth_is_a_trailing_mean():
    assert smooth([1, 3, 5, 7], 2) == [1, 2, 4, 6]


def test_optimiser_step_sets_the_rate_clips_the_gradient_and_returns_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=123.0)
    loss = (model(torch.full((1, 4), 100.0)) - 1e4).pow(2).mean()  # a huge gradient
    out = optimiser_step(model, optimizer, loss, lr=0.5, max_grad_norm=1.0)
    assert out == pytest.approx(loss.item()) and optimizer.param_groups[0]["lr"] == 0.5
    # plain SGD: the step is lr * the clipped gradient, whose norm is 1
    assert torch.linalg.vector_norm(model.weight.detach() - before).item() == pytest.approx(0.5, rel=1e-5)
