"""The test tree has no __init__.py files, so pytest imports test modules by their base name: two
test files with the same name in different folders make the whole run fail at collection."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_names_are_unique():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert not [name for name, count in names.items() if count > 1]
