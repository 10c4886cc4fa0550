"""InferenceConfig's follow setting: which pointer of the policy line a replica serves."""

from __future__ import annotations

import pytest

from services.inference.config import InferenceConfig
from shared.config import ConfigError, load_config
from shared.version_line import POLICY, POLICY_CANARY, POLICY_KINDS


def test_a_replica_follows_current_unless_it_is_in_the_canary_group():
    assert load_config(InferenceConfig, {}).follow == "current"
    cfg = load_config(InferenceConfig, {"RLHF_INFERENCE_FOLLOW": "canary"})
    assert POLICY_KINDS[cfg.follow] is POLICY_CANARY and POLICY_KINDS["current"] is POLICY
    assert POLICY_CANARY.topic == "rlhf.policy-canary"


@pytest.mark.parametrize("value", ["candidate", "stable", ""])
def test_any_other_pointer_is_refused_by_name(value):
    with pytest.raises(ConfigError, match="RLHF_INFERENCE_FOLLOW"):
        load_config(InferenceConfig, {"RLHF_INFERENCE_FOLLOW": value})
