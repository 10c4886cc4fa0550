"""Small pieces the offline steps share: one optimiser step, the loss maths, the learning-rate
schedule, loss curves (models are loaded by shared/models/loading.py).

    loss = causal_lm_loss(logits, labels)            # mean over labels != IGNORE (shifted by one)
    lr   = warmup_cosine_lr(step, total, warmup, peak)
    optimiser_step(model, optimizer, loss, lr)       # returns the loss as a float
    write_loss_curve(out_dir / "sft_loss.png", {"train": [(step, loss), ...]}, "SFT")
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE = -100
"""Label of a position that is not trained on (prompt tokens in SFT, padding everywhere)."""


def optimiser_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, max_grad_norm: float = 1.0
) -> float:
    """Set the learning rate, backpropagate ``loss``, clip the gradient norm, step; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: logits[:, t] predicts labels[:, t + 1]; IGNORE labels are skipped.

    reduction "mean" -> mean over counted tokens; "sum" -> their sum (for exact perplexities)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=IGNORE, reduction=reduction)


def counted_tokens(labels: torch.Tensor) -> int:
    """How many next-token predictions causal_lm_loss counts."""
    return int((labels[:, 1:] != IGNORE).sum())


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean negative log-likelihood per token); NaN without tokens."""
    return math.exp(nll_sum / tokens) if tokens else math.nan


def warmup_cosine_lr(step: int, total: int, warmup: int, peak: float, floor_fraction: float = 0.1) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to floor_fraction * peak at ``total``."""
    if total <= 0:
        raise ValueError("total steps must be positive")
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = floor_fraction * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def write_loss_curve(
    png: Path,
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    xlabel: str = "optimiser step",
    ylabel: str = "loss",
) -> None:
    """A PNG of (x, y) series and a JSON file beside it with the same numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.with_suffix(".json").write_text(json.dumps({k: [list(p) for p in v] for k, v in series.items()}) + "\n")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, points in series.items():
        if not points:
            continue
        xs, ys = zip(*points)
        marker = "o" if len(points) < 30 else None
        ax.plot(xs, ys, label=name, marker=marker, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
