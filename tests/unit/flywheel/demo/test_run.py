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


def test_the_demo_runs_with_canaries_and_its_own_gate_settings_unless_told_otherwise():
    from flywheel.demo.run import stack_environ

    env = stack_environ(load_config(DemoConfig, {}), {})
    assert env["RLHF_UP_ROLLOUT"] == "1"
    assert (env["RLHF_ROLLOUT_CANARY_SHARE"], env["RLHF_ROLLOUT_MARGIN"]) == ("0.3", "0.2")
    assert (env["RLHF_ROLLOUT_TIMEOUT_S"], env["RLHF_ROLLOUT_MIN_RATINGS"]) == ("600.0", "30")
    # The caller's own settings win; with canaries off none is set.
    mine = stack_environ(load_config(DemoConfig, {}), {"RLHF_ROLLOUT_CANARY_SHARE": "0.04"})
    assert mine["RLHF_ROLLOUT_CANARY_SHARE"] == "0.04"
    off = stack_environ(load_config(DemoConfig, {"RLHF_DEMO_CANARIES": "0"}), {})
    assert off["RLHF_UP_ROLLOUT"] == "0" and not any(k.startswith("RLHF_ROLLOUT_") for k in off)
    with pytest.raises(ConfigError, match="RLHF_DEMO_CANARY_SHARE must be in"):
        load_config(DemoConfig, {"RLHF_DEMO_CANARY_SHARE": "1.5"})


def test_the_demos_raters_are_trusted_so_the_per_principal_caps_are_off_unless_told_otherwise():
    from flywheel.demo.run import stack_environ

    env = stack_environ(load_config(DemoConfig, {}), {})
    assert env["RLHF_REWARD_MAX_PRINCIPAL_SHARE"] == env["RLHF_TRAINER_MAX_PRINCIPAL_SHARE"] == "1"
    open_system = stack_environ(load_config(DemoConfig, {"RLHF_DEMO_TRUSTED_RATERS": "0"}), {})
    assert "RLHF_REWARD_MAX_PRINCIPAL_SHARE" not in open_system
    assert "RLHF_TRAINER_MAX_PRINCIPAL_SHARE" not in open_system


def test_a_gate_decision_as_the_report_keeps_it():
    from flywheel.demo.run import gate_record
    from shared.pb import common_pb2, trainer_pb2

    refused = trainer_pb2.PublishResult(
        published=False,
        reason="guard frozen_rm:rm-0001: ...",
        refused_by="frozen_rm:rm-0001",
        compared=True,
        step=12,
        heldout_reward=0.5,
        baseline_reward=0.6,
        guards=[trainer_pb2.GuardCheck(name="frozen_rm:rm-0001", passed=False, value=0.1, baseline=0.3)],
    )
    doc = gate_record(refused, 3.5)
    assert doc["refused_by"] == "frozen_rm:rm-0001" and doc["compared"] and not doc["published"]
    assert doc["guards"] == [{"name": "frozen_rm:rm-0001", "passed": False, "value": 0.1, "baseline": 0.3}]
    rollback = trainer_pb2.PublishResult(
        published=True, reason="rolled back to policy-0002", version=common_pb2.ModelVersion(version="policy-0002")
    )
    assert gate_record(rollback, 9.0)["rollback"] is True and gate_record(refused, 0.0)["rollback"] is False


def test_the_demos_trainer_publishes_an_average_of_its_weights_unless_told_otherwise():
    from flywheel.demo.run import stack_environ
    from services.trainer.ppo_config import PPOConfig

    env = stack_environ(load_config(DemoConfig, {}), {})
    assert env["RLHF_PPO_AVERAGE_DECAY"] == "0.98"
    assert load_config(PPOConfig, env).average_decay == 0.98  # what the trainer will read
    mine = stack_environ(load_config(DemoConfig, {}), {"RLHF_PPO_AVERAGE_DECAY": "0"})
    assert load_config(PPOConfig, mine).average_decay == 0.0
    with pytest.raises(ConfigError, match="RLHF_DEMO_AVERAGE_DECAY must be in"):
        load_config(DemoConfig, {"RLHF_DEMO_AVERAGE_DECAY": "1"})
    with pytest.raises(ConfigError, match="RLHF_PPO_AVERAGE_DECAY must be in"):
        load_config(PPOConfig, {"RLHF_PPO_AVERAGE_DECAY": "-0.1"})
