"""Reading the project's JSONL data files (prompts, demonstrations, rankings): one parsed record per
non-blank line, and a bad line reported as ``file:line: what is wrong``.

    groups = read_jsonl(path, parse_ranking, RankingsFileError, what="rankings")

``parse`` gets each line's JSON value and raises ValueError (or a subclass) naming the problem;
``error`` is the file kind's own ValueError subclass, raised for a bad line or a file with no records.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def read_jsonl(path: Path, parse: Callable[[object], T], error: type[ValueError], what: str) -> list[T]:
    """Every record of ``path`` in file order; blank lines are skipped."""
    out: list[T] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line)))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                raise error(f"{path}:{number}: {exc}") from None
    if not out:
        raise error(f"{path}: no {what}")
    return out
