"""The offline steps' pure functions: loss, schedule, packing, SFT labels, file parsing."""

from __future__ import annotations

import json
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
from flywheel.bootstrap.pretrain import pack_documents, split_corpus
from flywheel.bootstrap.sft import DemonstrationsFileError, collate_demonstrations, read_demonstrations, response_labels


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


def test_pack_documents_separates_and_cuts_into_blocks():
    blocks = pack_documents([[1, 2, 3], [4, 5], [6]], separator=0, seq_len=3)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert pack_documents([[1, 2, 3, 4, 5]], separator=0, seq_len=4).tolist() == [[1, 2, 3, 4]]
    assert pack_documents([[7]], separator=0, seq_len=4).tolist() == [[7, 0, 0, 0]]


def test_split_corpus_is_seeded_disjoint_and_skips_blank_lines():
    lines = [f"line {i}" for i in range(100)] + ["", "   "]
    train, held = split_corpus(lines, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90 and not set(train) & set(held)
    assert split_corpus(lines, 0.1, seed=3) == (train, held)
    assert split_corpus(lines, 0.1, seed=4)[1] != held


def test_sft_trains_only_on_the_response():
    ids, labels = response_labels([5, 6, 7], [8, 9])
    assert ids == [5, 6, 7, 8, 9]
    assert labels == [IGNORE, IGNORE, IGNORE, 8, 9]
    x, mask, y = collate_demonstrations([(ids, labels), ([1, 2], [IGNORE, 2])], pad_id=0)
    assert x.tolist() == [[5, 6, 7, 8, 9], [1, 2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert y.tolist() == [[IGNORE, IGNORE, IGNORE, 8, 9], [IGNORE, 2, IGNORE, IGNORE, IGNORE]]
    # the loss then counts exactly the response tokens: 8 and 9 in row 0, 2 in row 1
    assert counted_tokens(y) == 3


def test_smooth_is_a_trailing_mean():
    assert smooth([1, 3, 5, 7], 2) == [1, 2, 4, 6]


def test_demonstrations_file_errors_name_the_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "What is 1 plus 1?"}], "response": "2"}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": [], "response": "x"}) + "\n")
    with pytest.raises(DemonstrationsFileError, match=r"d.jsonl:3: messages must be a non-empty list"):
        read_demonstrations(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "response": " "}) + "\n")
    with pytest.raises(DemonstrationsFileError, match=r":2: response must be a non-empty string"):
        read_demonstrations(path)
    path.write_text(json.dumps({**good, "messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DemonstrationsFileError, match=r":1: messages need a role"):
        read_demonstrations(path)
    path.write_text(json.dumps(good) + "\n")
    [d] = read_demonstrations(path)
    assert d.response == "2" and d.messages[0].role == "user"


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
