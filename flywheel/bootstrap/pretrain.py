"""Step 0 (built-in model only): a short pretraining of the default small model on a text corpus.

InstructGPT starts from a pretrained LM; the default model starts from random weights, so this
step teaches it the language of the shipped corpus (shared/data/corpus.txt: arithmetic, polite
phrases, simple facts) before SFT. Next-token prediction on the corpus' lines packed into blocks:

    stream = tokens(line 1) <|eos|> tokens(line 2) <|eos|> ...      cut into blocks of seq_len
    loss   = mean next-token cross-entropy over each block

A seeded ``heldout_fraction`` of the lines is never trained on: its perplexity is reported here and
by ``rlhf eval`` (the alignment tax: does RLHF make the policy worse at plain text?).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flywheel.bootstrap.common import (
    causal_lm_loss,
    counted_tokens,
    optimiser_step,
    perplexity,
    warmup_cosine_lr,
)
from shared.logging import get_logger, log_event
from shared.models.default_model import DOC_END
from shared.models.loading import load_causal_lm, load_tokenizer

log = get_logger(__name__)


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 400
    """Optimiser steps."""
    seq_len: int = 128
    """Tokens per training block."""
    batch_size: int = 16
    """Blocks per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (warm-up, then cosine decay)."""
    warmup: int = 50
    """Warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    heldout_fraction: float = 0.05
    """Share of corpus lines held out for perplexity (the same split in rlhf eval)."""
    seed: int = 0
    """Seed of the split and of the block order."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.seq_len < 2 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps >= 1, seq_len >= 2, batch_size >= 1 and lr > 0 are required")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in (0, 1)")


@dataclass(frozen=True)
class PretrainResult:
    losses: list[tuple[int, float]]
    """(step, training loss) of every step."""
    heldout: list[tuple[int, float]]
    """(step, held-out perplexity) at the start, a few times during training, and at the end."""
    tokens_seen: int
    seconds: float


def split_corpus(lines: list[str], heldout_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held out) non-empty lines; a seeded choice, stable for a given corpus."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    rng = random.Random(seed)
    held_idx = set(rng.sample(range(len(lines)), max(1, round(heldout_fraction * len(lines)))))
    return (
        [ln for i, ln in enumerate(lines) if i not in held_idx],
        [ln for i, ln in enumerate(lines) if i in held_idx],
    )


def read_corpus(
    path: Path, heldout_fraction: float = PretrainSettings.heldout_fraction, seed: int = 0
) -> tuple[list[str], list[str]]:
    return split_corpus(Path(path).read_text(encoding="utf-8").splitlines(), heldout_fraction, seed)


def pack_documents(docs: list[list[int]], separator: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents, each followed by ``separator``, and cut into (n, seq_len) blocks;
    the last partial block is dropped (at least one block when there is anything at all)."""
    stream = [t for d in docs for t in (*d, separator)]
    n = len(stream) // seq_len
    if n == 0:
        stream = stream + [separator] * (seq_len - len(stream))
        n = 1
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def corpus_blocks(tokenizer: Any, lines: list[str], seq_len: int) -> torch.Tensor:
    docs = tokenizer(lines, add_special_tokens=False)["input_ids"]
    return pack_documents(docs, tokenizer.convert_tokens_to_ids(DOC_END), seq_len)


@torch.no_grad()
def blocks_perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Perplexity of the model on packed blocks (every next-token prediction counted once)."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        logits = model(input_ids=ids).logits
        nll += float(causal_lm_loss(logits, ids, reduction="sum"))
        count += counted_tokens(ids)
    return perplexity(nll, count)


def heldout_perplexity(
    tokenizer: Any,
    model: torch.nn.Module,
    corpus: Path,
    seq_len: int = PretrainSettings.seq_len,
    heldout_fraction: float = PretrainSettings.heldout_fraction,
    seed: int = 0,
    max_lines: int | None = None,
) -> float:
    """Perplexity of a causal LM (and its tokenizer) on the held-out lines of ``corpus``."""
    _, held = read_corpus(corpus, heldout_fraction, seed)
    held = held[:max_lines] if max_lines else held
    return blocks_perplexity(model, corpus_blocks(tokenizer, held, seq_len))


def pretrain(
    model_dir: Path, corpus: Path, settings: PretrainSettings = PretrainSettings(), eval_points: int = 4
) -> PretrainResult:
    """Train the causal LM in ``model_dir`` on ``corpus`` and save it back there (safetensors)."""
    from tqdm import tqdm

    started = time.monotonic()
    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    train_lines, held_lines = read_corpus(corpus, settings.heldout_fraction, settings.seed)
    train_blocks = corpus_blocks(tokenizer, train_lines, settings.seq_len)
    held_blocks = corpus_blocks(tokenizer, held_lines, settings.seq_len)
    log_event(
        log,
        "pretraining",
        corpus=str(corpus),
        train_blocks=len(train_blocks),
        heldout_blocks=len(held_blocks),
        seq_len=settings.seq_len,
        steps=settings.steps,
        epochs=round(settings.steps * settings.batch_size / len(train_blocks), 1),
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95)
    )
    gen = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(train_blocks), generator=gen)
    cursor = 0
    losses: list[tuple[int, float]] = []
    heldout = [(0, blocks_perplexity(model, held_blocks))]
    eval_at = {round(settings.steps * k / eval_points) for k in range(1, eval_points)}
    bar = tqdm(range(1, settings.steps + 1), desc="step 0 pretrain", unit="step", dynamic_ncols=True)
    for step in bar:
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(train_blocks), generator=gen), 0
        ids = train_blocks[order[cursor : cursor + settings.batch_size]]
        cursor += settings.batch_size
        model.train()
        loss = causal_lm_loss(model(input_ids=ids).logits, ids)
        lr = warmup_cosine_lr(step - 1, settings.steps, settings.warmup, settings.lr)
        losses.append((step, optimiser_step(model, optimizer, loss, lr)))
        bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
        if step in eval_at:
            heldout.append((step, blocks_perplexity(model, held_blocks)))
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}", heldout_ppl=f"{heldout[-1][1]:.2f}")
    bar.close()
    heldout.append((settings.steps, blocks_perplexity(model, held_blocks)))
    model.save_pretrained(model_dir)
    seconds = time.monotonic() - started
    tokens = settings.steps * settings.batch_size * settings.seq_len
    log_event(
        log,
        "pretrained",
        loss=round(losses[-1][1], 4),
        heldout_ppl_before=round(heldout[0][1], 2),
        heldout_ppl=round(heldout[-1][1], 2),
        tokens=tokens,
        tokens_per_s=round(tokens / seconds),
        seconds=round(seconds, 1),
    )
    if not math.isfinite(heldout[-1][1]):
        raise RuntimeError("pretraining diverged: held-out perplexity is not finite")
    return PretrainResult(losses, heldout, tokens, seconds)
