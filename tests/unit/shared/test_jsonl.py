"""shared.jsonl.read_jsonl: records in order, blank lines skipped, a bad line named by file:line."""

import pytest

from shared.jsonl import read_jsonl


class NumbersFileError(ValueError):
    pass


def parse_number(doc: object) -> int:
    if not isinstance(doc, dict) or not isinstance(doc.get("n"), int):
        raise ValueError('each line must be {"n": <integer>}')
    return doc["n"]


def test_records_come_in_file_order_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text('{"n": 3}\n\n   \n{"n": 1}\n')
    assert read_jsonl(path, parse_number, NumbersFileError, "numbers") == [3, 1]


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"n": 1}\n{"n": "two"}\n', ':2: each line must be {"n": <integer>}'),
        ('{"n": 1}\n{"n": \n', ":2: Expecting value"),
        ("\n\n", ": no numbers"),
    ],
)
def test_a_bad_line_or_an_empty_file_raises_the_callers_error_naming_the_place(tmp_path, text, message):
    path = tmp_path / "numbers.jsonl"
    path.write_text(text)
    with pytest.raises(NumbersFileError) as err:
        read_jsonl(path, parse_number, NumbersFileError, "numbers")
    assert str(err.value).startswith(str(path)) and message in str(err.value)
