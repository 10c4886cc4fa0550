"""The pretraining step's pure functions: corpus split and document packing."""

from __future__ import annotations

from flywheel.bootstrap.pretrain import pack_documents, split_corpus


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
