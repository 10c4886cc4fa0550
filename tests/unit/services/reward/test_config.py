"""RewardConfig: the caps' and quarantine's settings are validated at start, each bad value named."""

from __future__ import annotations

import pytest

from services.reward.config import RewardConfig
from shared.config import ConfigError, load_config


def test_defaults_cap_at_a_tenth_and_quarantine_contrary_raters():
    cfg = load_config(RewardConfig, {})
    assert (cfg.max_principal_share, cfg.min_principal_cap) == (0.1, 8)
    assert (cfg.quarantine_below, cfg.quarantine_min_items) == (0.4, 20)


@pytest.mark.parametrize(
    "env, words",
    [
        ({"RLHF_REWARD_MAX_PRINCIPAL_SHARE": "0"}, "RLHF_REWARD_MAX_PRINCIPAL_SHARE must be in"),
        ({"RLHF_REWARD_MAX_PRINCIPAL_SHARE": "1.5"}, "RLHF_REWARD_MAX_PRINCIPAL_SHARE must be in"),
        ({"RLHF_REWARD_MIN_PRINCIPAL_CAP": "0"}, "RLHF_REWARD_MIN_PRINCIPAL_CAP"),
        ({"RLHF_REWARD_QUARANTINE_BELOW": "-0.1"}, "RLHF_REWARD_QUARANTINE_BELOW"),
        ({"RLHF_REWARD_QUARANTINE_MIN_ITEMS": "0"}, "RLHF_REWARD_QUARANTINE_MIN_ITEMS"),
    ],
)
def test_bad_values_are_named(env, words):
    with pytest.raises(ConfigError, match=words):
        load_config(RewardConfig, env)


def test_the_cap_and_quarantine_can_be_turned_off():
    cfg = load_config(RewardConfig, {"RLHF_REWARD_MAX_PRINCIPAL_SHARE": "1", "RLHF_REWARD_QUARANTINE_BELOW": "0"})
    assert cfg.max_principal_share == 1.0 and cfg.quarantine_below == 0.0


def test_device_and_precision_default_to_the_cpu_in_float32_and_bad_values_are_named():
    cfg = load_config(RewardConfig, {})
    assert (cfg.device, cfg.precision) == ("cpu", "auto")
    assert load_config(RewardConfig, {"RLHF_REWARD_PRECISION": "bf16"}).precision == "bf16"
    with pytest.raises(ConfigError, match="RLHF_REWARD_DEVICE: device 'cuda:3'"):
        load_config(RewardConfig, {"RLHF_REWARD_DEVICE": "cuda:3"})
    with pytest.raises(ConfigError, match="RLHF_REWARD_PRECISION='fp16': expected one of auto, float32, bf16"):
        load_config(RewardConfig, {"RLHF_REWARD_PRECISION": "fp16"})
