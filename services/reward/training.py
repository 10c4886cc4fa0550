"""Training the reward model on comparison groups and pointwise thumbs: the one code path that the
offline start (offline.py, a rankings file) and the live learner (ratings from rlhf.feedback) share.

    trainer = RewardTrainer(model, tokenizer, TrainSettings(epochs=3))
    trainer.fit(examples)                           # TrainingExamples with Samples (comparisons.py)
    accuracy, loss = trainer.evaluate(held_out_groups)
    trainer.normalise(reference_samples, "what they are")   # reference responses score 0 on average

One batch = ``batch_size`` ratings (groups or pointwise examples); every distinct (conversation,
response) in it is scored once, in forward passes of at most ``max_forward_batch`` sequences, and
the loss is losses.preference_batch_loss (every rating one batch element, as InstructGPT does with
the C(K,2) pairs of a ranking).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from services.reward.comparisons import ComparisonGroup, PointwiseExample, Sample, TrainingExamples, sample_key
from services.reward.losses import normalisation_offset, pairwise_accuracy, preference_batch_loss
from shared.logging import get_logger, log_event
from shared.models.encoding import EncodingLimits, encode_rm_input, pad_batch
from shared.models.reward_model import RewardModel
from shared.version_line import VersionLine

log = get_logger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 3
    """Passes over the training examples."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (the head and every backbone weight)."""
    batch_size: int = 8
    """Ratings (comparison groups or pointwise thumbs) per optimiser step."""
    max_forward_batch: int = 32
    """Most sequences in one forward pass (memory bound)."""
    pointwise_weight: float = 1.0
    """Weight of a lone thumb's logistic term relative to one comparison group."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm); 0 disables it."""
    freeze_backbone: bool = False
    """Train the scalar head only (fast, cheap updates); the backbone keeps its weights."""
    seed: int = 0
    """Shuffling seed: the same data and settings give the same model."""
    limits: EncodingLimits = EncodingLimits()
    """Truncation of training sequences: the same rule as scoring."""

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.max_forward_batch < 1 or self.lr <= 0:
            raise ValueError("epochs >= 0, batch_size >= 1, max_forward_batch >= 1 and lr > 0 are required")


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    """Mean batch loss over the epoch."""
    accuracy: float
    """Fraction of the epoch's pairs whose winner scored higher (during training, before each step)."""
    pairs: int
    seconds: float


Progress = Callable[[EpochStats], None]


class RewardTrainer:
    def __init__(self, model: RewardModel, tokenizer: Any, settings: TrainSettings = TrainSettings()):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.pad_id = _pad_id(tokenizer)
        for p in model.backbone.parameters():
            p.requires_grad_(not settings.freeze_backbone)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        self._ids: dict[tuple, list[int]] = {}
        self.steps = 0

    # --- scoring helpers ------------------------------------------------------------------------

    def token_ids(self, s: Sample) -> list[int]:
        key = sample_key(s)
        ids = self._ids.get(key)
        if ids is None:
            ids = self._ids[key] = encode_rm_input(
                self.tokenizer, s.messages, s.response, self.settings.limits
            ).input_ids
        return ids

    def scores(self, samples: Sequence[Sample], raw: bool = False) -> torch.Tensor:
        """Rewards of ``samples`` (with the graph when grad is enabled), in forward passes of
        at most max_forward_batch sequences sorted by length to keep padding small."""
        seqs = [self.token_ids(s) for s in samples]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: list[torch.Tensor | None] = [None] * len(seqs)
        step = self.settings.max_forward_batch
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            ids, mask = pad_batch([seqs[i] for i in chunk], self.pad_id)
            r = self.model.raw_scores(ids, mask) if raw else self.model(ids, mask)
            for j, i in enumerate(chunk):
                out[i] = r[j]
        return torch.stack(cast("list[torch.Tensor]", out))  # every slot is filled by now

    # --- training --------------------------------------------------------------------------------

    def _batch_inputs(
        self, items: Sequence[ComparisonGroup | PointwiseExample]
    ) -> tuple[list[Sample], list[tuple[list[int], list[tuple[int, int]]]], list[tuple[int, float]]]:
        """Distinct samples of a batch and, per rating, where its responses are among them."""
        index: dict[tuple, int] = {}
        samples: list[Sample] = []

        def slot(s: Sample) -> int:
            key = sample_key(s)
            if key not in index:
                index[key] = len(samples)
                samples.append(s)
            return index[key]

        groups, pointwise = [], []
        for it in items:
            if isinstance(it, ComparisonGroup):
                groups.append(([slot(s) for s in it.responses], list(it.pairs)))
            else:
                pointwise.append((slot(it.response), it.label))
        return samples, groups, pointwise

    def step(self, items: Sequence[ComparisonGroup | PointwiseExample]) -> tuple[float, int, int]:
        """One optimiser step on a batch of ratings; returns (loss, pairs right, pairs)."""
        samples, groups, pointwise = self._batch_inputs(items)
        self.model.train()
        rewards = self.scores(samples)
        loss = preference_batch_loss(rewards, groups, pointwise, self.settings.pointwise_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.settings.max_grad_norm
            )
        self.optimizer.step()
        self.steps += 1
        right, total = pairwise_accuracy(rewards.detach(), groups)
        return float(loss.detach()), right, total

    def fit(
        self, examples: TrainingExamples, epochs: int | None = None, progress: Progress | None = None
    ) -> list[EpochStats]:
        """Train for ``epochs`` (default: settings.epochs) shuffled passes; logs one line per epoch."""
        items: list[ComparisonGroup | PointwiseExample] = [*examples.groups, *examples.pointwise]
        if not items:
            raise ValueError("nothing to train on")
        rng = random.Random(self.settings.seed)
        history = []
        n_epochs = self.settings.epochs if epochs is None else epochs
        bs = self.settings.batch_size
        for epoch in range(1, n_epochs + 1):
            started = time.monotonic()
            rng.shuffle(items)
            losses, right, total = [], 0, 0
            for start in range(0, len(items), bs):
                loss, r, t = self.step(items[start : start + bs])
                losses.append(loss)
                right += r
                total += t
            seconds = time.monotonic() - started
            stats = EpochStats(epoch, sum(losses) / len(losses), right / total if total else math.nan, total, seconds)
            history.append(stats)
            log_event(
                log,
                "reward model epoch",
                epoch=f"{epoch}/{n_epochs}",
                loss=round(stats.loss, 4),
                train_accuracy=round(stats.accuracy, 3),
                ratings=len(items),
                pairs=total,
                pairs_per_s=round(total / max(seconds, 1e-9), 1),
                seconds=round(seconds, 2),
            )
            if progress:
                progress(stats)
        self.model.eval()
        return history

    # --- evaluation and normalisation ------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, groups: Sequence[ComparisonGroup]) -> tuple[float, float]:
        """(pairwise accuracy, mean group loss) of ``groups``; NaNs when there are none."""
        if not groups:
            return math.nan, math.nan
        self.model.eval()
        samples, gidx, _ = self._batch_inputs(groups)
        rewards = self.scores(samples)
        right, total = pairwise_accuracy(rewards, gidx)
        loss = preference_batch_loss(rewards, gidx)
        return right / total, float(loss)

    @torch.no_grad()
    def normalise(self, reference: Sequence[Sample], description: str) -> float:
        """Set the offset so that ``reference`` scores 0 on average; returns the offset."""
        if not reference:
            raise ValueError("no reference responses to normalise on")
        self.model.eval()
        distinct = list({sample_key(s): s for s in reference}.values())
        offset = normalisation_offset(self.scores(distinct, raw=True))
        self.model.set_offset(offset, f"{description} ({len(distinct)} responses)")
        return offset


def publish_reward_model(
    line: VersionLine,
    model: RewardModel,
    tokenizer: Any,
    *,
    parent: str | None,
    metrics: dict[str, float],
    extra: dict[str, Any],
    make_current: bool = True,
) -> Any:
    """Save ``model`` (safetensors + reward_head.json + tokenizer) and publish it as the next version
    of the rm ``line`` (its announcement is then owed); returns its Manifest. NaN metrics (e.g. no
    held-out slice) are left out."""
    import tempfile
    from pathlib import Path

    metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    with tempfile.TemporaryDirectory(prefix="rlhf-rm-") as tmp:
        model.save(Path(tmp), tokenizer)
        return line.publish(Path(tmp), parent=parent, metrics=metrics, extra=extra, make_current=make_current)


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
