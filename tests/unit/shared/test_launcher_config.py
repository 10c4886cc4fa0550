"""`rlhf up` settings: which services, and what to do with an empty model store, are checked at start."""

import pytest

from shared.config import ConfigError, load_config
from shared.launcher import ALL_SERVICES, UpConfig


def test_defaults_start_every_service_and_run_the_full_bootstrap():
    cfg = load_config(UpConfig, {})
    assert cfg.services == ALL_SERVICES and cfg.bootstrap == "full"


def test_a_subset_without_its_dependencies_is_refused_naming_them():
    with pytest.raises(ConfigError, match="trainer needs inference, reward"):
        load_config(UpConfig, {"RLHF_UP_SERVICES": "trainer"})
    with pytest.raises(ConfigError, match="gateway needs inference"):
        load_config(UpConfig, {"RLHF_UP_SERVICES": "feedback,gateway"})
    assert load_config(UpConfig, {"RLHF_UP_SERVICES": "inference,feedback,gateway"}).services == (
        "inference", "feedback", "gateway")


def test_unknown_service_and_bootstrap_mode_are_refused():
    with pytest.raises(ConfigError, match="unknown services \\['trainers'\\]"):
        load_config(UpConfig, {"RLHF_UP_SERVICES": "inference,reward,trainers"})
    with pytest.raises(ConfigError, match="RLHF_UP_BOOTSTRAP='fast': expected full or quick"):
        load_config(UpConfig, {"RLHF_UP_BOOTSTRAP": "fast"})
