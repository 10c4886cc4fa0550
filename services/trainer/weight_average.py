"""An exponential moving average of the policy's weights: what the trainer publishes when it is on.

PPO's iterates are noisy: on a demo run's store the held-out gold thumbs-up of published versions
swung between 67% and 83% while the served (training-prompt) rate sat at 85-90%, and on two runs'
stores the average of the 16 versions ending at a version beat that version by 4-15 points in every
window looked at (docs/benchmarks.md, "Publishing an average of the weights": online, the served
policy's KL fell from 9 to 1-2 nats; a gain in the final win rate was within run-to-run noise). Averaging the iterates of SGD is the
old cure for this noise (Polyak and Juditsky 1992); an exponential average keeps one copy of the
trainable tensors and needs no list of past versions:

    beta_t = min(beta, (1 + t) / (10 + t))              (t = updates so far; TensorFlow's num_updates)
    avg_t  = beta_t * avg_{t-1} + (1 - beta_t) * theta_t,      avg_0 = theta_0

The warm-up makes the first updates count almost equally (a plain EMA with beta = 0.98 would hold
the published policy at the start weights for ~50 steps), so the average's window grows with the
run up to about 1 / (1 - beta) updates.

The learner trains its own weights (theta) as before; the average is what it evaluates at the gate
and publishes. Rollouts the served average samples are then off-policy for the learner, as any
rollout from a version older than its weights is: their behaviour logprobs are PPO's old logprobs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

WARMUP_OFFSET = 10
"""The 10 of ``(1 + t) / (10 + t)``."""


def check_decay(decay: float) -> float:
    """``decay`` if it is a valid beta (in [0, 1)), else ValueError."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    return decay


def average_decay(decay: float, updates: int) -> float:
    """beta_t = min(beta, (1 + t) / (10 + t)) for ``updates`` = t >= 1 (the update being applied)."""
    check_decay(decay)
    if updates < 1:
        raise ValueError(f"updates counts from 1, got {updates}")
    return min(decay, (1 + updates) / (WARMUP_OFFSET + updates))


@torch.no_grad()
def ema_update_(average: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], beta: float) -> None:
    """In place: avg <- beta * avg + (1 - beta) * theta for floating tensors; others are copied
    (an integer buffer has no average). Both mappings hold the same names and shapes."""
    if average.keys() != weights.keys():
        odd = sorted(average.keys() ^ weights.keys())
        raise ValueError(f"the average and the weights hold different tensors, e.g. {odd[0]}")
    for name, avg in average.items():
        theta = weights[name].detach().to(avg.device)
        if avg.is_floating_point():
            avg.mul_(beta).add_(theta.to(avg.dtype), alpha=1.0 - beta)
        else:
            avg.copy_(theta)


class WeightAverage:
    """The moving average of a set of named tensors (the policy's trainable ones), kept in float32
    (a bf16 average would round away the small steps it is made of)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], decay: float, updates: int = 0):
        self.decay = check_decay(decay)
        self.updates = updates
        """Updates folded in since the average was last reset to the weights."""
        self.tensors: dict[str, torch.Tensor] = {
            name: (t.detach().float() if t.is_floating_point() else t.detach()).clone() for name, t in weights.items()
        }

    def update(self, weights: Mapping[str, torch.Tensor]) -> float:
        """Fold in the weights after one more update; returns the beta used."""
        self.updates += 1
        beta = average_decay(self.decay, self.updates)
        ema_update_(self.tensors, weights, beta)
        return beta

    def load(self, tensors: Mapping[str, torch.Tensor], updates: int) -> None:
        """Restore an average a checkpoint kept (same names and shapes as this one)."""
        if tensors.keys() != self.tensors.keys():
            odd = sorted(tensors.keys() ^ self.tensors.keys())
            raise ValueError(f"the checkpoint's weight average does not match this policy, e.g. {odd[0]}")
        for name, t in tensors.items():
            if t.shape != self.tensors[name].shape:
                raise ValueError(f"the checkpoint's weight average of {name} has shape {tuple(t.shape)}")
            self.tensors[name].copy_(t)
        self.updates = updates


@contextmanager
def swapped_in(weights: Mapping[str, torch.Tensor], replacement: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block the tensors ``weights`` (a module's own, shared storage) hold
    ``replacement``'s values; afterwards their own again, exceptions included."""
    with torch.no_grad():
        saved = {name: t.detach().clone() for name, t in weights.items()}
        for name, t in weights.items():
            t.copy_(replacement[name].to(t.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, t in weights.items():
                t.copy_(saved[name])
