"""tests/benchmarks/stack_settings.py: the RLHF_NAME=VALUE items of --stack-env / --loop-env."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# The benchmark scripts import their helpers by bare name; loaded from its file, not via sys.path.
_PATH = Path(__file__).resolve().parents[3] / "tests" / "benchmarks" / "stack_settings.py"
_SPEC = importlib.util.spec_from_file_location("stack_settings", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
stack_settings = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(stack_settings)
parse_settings = stack_settings.parse_settings


def test_items_become_settings_and_a_later_one_wins():
    items = ["RLHF_UP_ROLLOUT=0", "RLHF_X=a=b", "RLHF_EMPTY=", "RLHF_UP_ROLLOUT=1"]
    assert parse_settings(items) == {"RLHF_UP_ROLLOUT": "1", "RLHF_X": "a=b", "RLHF_EMPTY": ""}


@pytest.mark.parametrize("item", ["RLHF_X", "PATH=/bin", "=1", "RLHF_=1", "rlhf_x=1"])
def test_an_item_that_is_not_rlhf_name_value_is_named(item):
    with pytest.raises(ValueError, match="expected RLHF_NAME=VALUE") as err:
        parse_settings(["RLHF_OK=1", item])
    assert repr(item) in str(err.value)
