"""`rlhf up` settings: which services, and what to do with an empty model store, are checked at start."""

import os

import pytest

from flywheel.launcher import ALL_SERVICES, UpConfig
from shared.config import ConfigError, load_config


def test_defaults_start_every_service_and_run_the_full_bootstrap():
    cfg = load_config(UpConfig, {})
    assert cfg.services == ALL_SERVICES and cfg.bootstrap == "full"


def test_a_subset_without_its_dependencies_is_refused_naming_them():
    with pytest.raises(ConfigError, match="trainer needs inference, reward"):
        load_config(UpConfig, {"RLHF_UP_SERVICES": "trainer"})
    with pytest.raises(ConfigError, match="gateway needs inference"):
        load_config(UpConfig, {"RLHF_UP_SERVICES": "feedback,gateway"})
    assert load_config(UpConfig, {"RLHF_UP_SERVICES": "inference,feedback,gateway"}).services == (
        "inference",
        "feedback",
        "gateway",
    )


def test_unknown_service_and_bootstrap_mode_are_refused():
    with pytest.raises(ConfigError, match="unknown services \\['trainers'\\]"):
        load_config(UpConfig, {"RLHF_UP_SERVICES": "inference,reward,trainers"})
    with pytest.raises(ConfigError, match="RLHF_UP_BOOTSTRAP='fast': expected full or quick"):
        load_config(UpConfig, {"RLHF_UP_BOOTSTRAP": "fast"})


def test_with_a_log_dir_a_services_output_goes_to_its_file_and_a_failure_names_it(tmp_path):
    from flywheel.launcher import ServiceProcess, Stack

    stack = Stack(load_config(UpConfig, {"RLHF_UP_LOG_DIR": str(tmp_path / "logs")}), {"PATH": os.environ["PATH"]})
    # `python -m this` prints the Zen of Python and exits: a service that dies while starting.
    svc = ServiceProcess("zen", "this", ready=lambda: False, endpoints={})
    with pytest.raises(RuntimeError) as err:
        stack._spawn(svc)
    log_file = tmp_path / "logs" / "zen.log"
    assert str(log_file) in str(err.value) and "exited with code 0" in str(err.value)
    assert "Beautiful is better than ugly." in log_file.read_text()
