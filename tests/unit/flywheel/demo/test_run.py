"""`rlhf demo` settings: the simulated users' keys are checked at start, one per user."""

import pytest

from flywheel.demo.run import DemoConfig
from shared.config import ConfigError, load_config

KEYS = "sim-a:" + "a" * 32 + ",sim-b:" + "b" * 32


def test_the_users_keys_are_checked_and_must_cover_every_user():
    assert load_config(DemoConfig, {"RLHF_DEMO_API_KEYS": KEYS, "RLHF_DEMO_USERS": "2"}).api_keys == KEYS
    with pytest.raises(ConfigError, match="RLHF_DEMO_API_KEYS has 2 keys for RLHF_DEMO_USERS=3 users"):
        load_config(DemoConfig, {"RLHF_DEMO_API_KEYS": KEYS, "RLHF_DEMO_USERS": "3"})
    with pytest.raises(ConfigError, match="RLHF_DEMO_API_KEYS: entry 1 has no name"):
        load_config(DemoConfig, {"RLHF_DEMO_API_KEYS": "a" * 32})
