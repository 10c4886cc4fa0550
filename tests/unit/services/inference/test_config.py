"""The inference service's settings are checked at load, each problem naming its variable."""

from __future__ import annotations

import pytest

from services.inference.config import InferenceConfig
from shared.config import ConfigError, load_config


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
