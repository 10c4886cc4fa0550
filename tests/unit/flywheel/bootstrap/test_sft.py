"""The SFT step's pure functions: response-only labels, collation, demonstrations file parsing."""

from __future__ import annotations

import json

import pytest

from flywheel.bootstrap.common import IGNORE, counted_tokens
from flywheel.bootstrap.sft import DemonstrationsFileError, collate_demonstrations, read_demonstrations, response_labels


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
