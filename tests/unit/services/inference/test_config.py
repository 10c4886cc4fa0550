"""InferenceConfig's settings, each problem naming its variable: the follow setting (which pointer of
the policy line a replica serves) and the rolling-swap settings."""

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


def test_rolling_swap_settings_load():
    cfg = load_config(
        InferenceConfig,
        {"RLHF_INFERENCE_SWAP_LEASE_DIR": "/models", "RLHF_INFERENCE_SWAP_DRAIN_TIMEOUT_S": "20"},
    )
    assert str(cfg.swap_lease_dir) == "/models" and cfg.swap_drain_timeout_s == 20
    assert load_config(InferenceConfig, {}).swap_lease_dir is None, "one replica by default: swaps in place"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RLHF_INFERENCE_SWAP_DRAIN_TIMEOUT_S": "0"}, "RLHF_INFERENCE_SWAP_DRAIN_TIMEOUT_S must be positive"),
        ({"RLHF_INFERENCE_SWAP_SETTLE_S": "-1"}, "RLHF_INFERENCE_SWAP_SETTLE_S not negative"),
        (
            {"RLHF_INFERENCE_SWAP_LEASE_TTL_S": "60", "RLHF_INFERENCE_SWAP_DRAIN_TIMEOUT_S": "60"},
            "RLHF_INFERENCE_SWAP_LEASE_TTL_S=60 must exceed a swap",
        ),
    ],
)
def test_bad_rolling_swap_settings_are_refused_naming_the_variable(env, message):
    with pytest.raises(ConfigError) as err:
        load_config(InferenceConfig, env)
    assert message in str(err.value)
