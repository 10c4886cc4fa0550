"""InferenceConfig's settings, each problem naming its variable: the follow setting (which pointer of
the policy line a replica serves), the swap settings (bounded by default, the rolling-swap lease) and
priority scheduling."""

from __future__ import annotations

import math

import pytest

from services.inference.config import InferenceConfig, lora_batch, rolling_swap_bound_s, swap_drain_s
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


def test_the_default_swap_is_bounded_and_each_mode_has_its_drain():
    cfg = load_config(InferenceConfig, {})
    assert cfg.swap_mode == "bounded" and 0 < swap_drain_s(cfg) == cfg.swap_drain_budget_s < 1
    drain = load_config(InferenceConfig, {"RLHF_INFERENCE_SWAP_MODE": "drain"})
    immediate = load_config(InferenceConfig, {"RLHF_INFERENCE_SWAP_MODE": "immediate"})
    assert swap_drain_s(drain) == math.inf and swap_drain_s(immediate) == 0
    budget = load_config(InferenceConfig, {"RLHF_INFERENCE_SWAP_DRAIN_BUDGET_S": "0.1"})
    assert swap_drain_s(budget) == 0.1


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RLHF_INFERENCE_SWAP_MODE": "lazy"}, "RLHF_INFERENCE_SWAP_MODE='lazy': expected bounded, drain or immediate"),
        ({"RLHF_INFERENCE_SWAP_DRAIN_BUDGET_S": "-0.5"}, "RLHF_INFERENCE_SWAP_DRAIN_BUDGET_S=-0.5"),
        ({"RLHF_INFERENCE_SWAP_DRAIN_BUDGET_S": "nan"}, "RLHF_INFERENCE_SWAP_DRAIN_BUDGET_S=nan"),
        ({"RLHF_INFERENCE_SWAP_DRAIN_BUDGET_S": "inf"}, "RLHF_INFERENCE_SWAP_DRAIN_BUDGET_S=inf"),
    ],
)
def test_bad_swap_settings_are_refused_naming_the_variable(env, message):
    with pytest.raises(ConfigError) as err:
        load_config(InferenceConfig, env)
    assert message in str(err.value)


def test_the_lease_must_outlast_a_rolling_swap_including_its_drain_budget():
    cfg = load_config(InferenceConfig, {})
    assert rolling_swap_bound_s(cfg) == cfg.swap_drain_timeout_s + cfg.swap_drain_budget_s + 2 * cfg.swap_settle_s + 30
    env = {
        "RLHF_INFERENCE_SWAP_DRAIN_TIMEOUT_S": "30",
        "RLHF_INFERENCE_SWAP_SETTLE_S": "0",
        "RLHF_INFERENCE_SWAP_LEASE_TTL_S": "65",
    }
    assert load_config(InferenceConfig, {**env, "RLHF_INFERENCE_SWAP_DRAIN_BUDGET_S": "5"}).swap_lease_ttl_s == 65
    with pytest.raises(ConfigError, match="RLHF_INFERENCE_SWAP_LEASE_TTL_S=65 must exceed a swap"):
        load_config(InferenceConfig, {**env, "RLHF_INFERENCE_SWAP_DRAIN_BUDGET_S": "6"})


def test_priority_scheduling_is_on_unless_turned_off():
    assert load_config(InferenceConfig, {}).priority_scheduling is True
    assert load_config(InferenceConfig, {"RLHF_INFERENCE_PRIORITY_SCHEDULING": "0"}).priority_scheduling is False


def test_adapter_serving_is_off_by_default_and_its_bounds_load():
    assert load_config(InferenceConfig, {}).lora_adapters is False
    cfg = load_config(
        InferenceConfig,
        {
            "RLHF_INFERENCE_LORA_ADAPTERS": "1",
            "RLHF_INFERENCE_LORA_MAX_LOADED": "3",
            "RLHF_INFERENCE_LORA_MAX_RANK": "8",
        },
    )
    assert (cfg.lora_adapters, cfg.lora_max_loaded, lora_batch(cfg), cfg.lora_max_rank) == (True, 3, 3, 8)
    assert lora_batch(load_config(InferenceConfig, {"RLHF_INFERENCE_LORA_MAX_BATCH": "2"})) == 2


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RLHF_INFERENCE_LORA_MAX_RANK": "4"}, "RLHF_INFERENCE_LORA_MAX_RANK=4: expected one of 1, 8, 16"),
        ({"RLHF_INFERENCE_LORA_MAX_LOADED": "1"}, "RLHF_INFERENCE_LORA_MAX_LOADED=1: at least 2"),
        ({"RLHF_INFERENCE_LORA_MAX_BATCH": "5"}, "RLHF_INFERENCE_LORA_MAX_BATCH=5: expected 0 (all) to"),
        ({"RLHF_INFERENCE_LORA_MAX_BATCH": "-1"}, "RLHF_INFERENCE_LORA_MAX_BATCH=-1"),
    ],
)
def test_bad_adapter_settings_are_refused_naming_the_variable(env, message):
    with pytest.raises(ConfigError) as err:
        load_config(InferenceConfig, env)
    assert message in str(err.value)


def test_the_prompt_bound_and_the_outbox_settings_load_and_are_checked_by_name(tmp_path):
    from services.inference.config import outbox_spill_dir

    cfg = load_config(
        InferenceConfig,
        {"RLHF_INFERENCE_MAX_PROMPT_CHARS": "65536", "RLHF_INFERENCE_STATE_DIR": str(tmp_path)},
    )
    assert cfg.max_prompt_chars == 65536 and cfg.outbox_max_attempts == 20
    assert outbox_spill_dir(cfg, 50051) == tmp_path / "outbox-50051"
    for env, name in [
        ({"RLHF_INFERENCE_MAX_PROMPT_CHARS": "100"}, "RLHF_INFERENCE_MAX_PROMPT_CHARS"),  # below one message's bound
        ({"RLHF_INFERENCE_OUTBOX_SPILL_MAX_MB": "1"}, "RLHF_INFERENCE_OUTBOX_SPILL_MAX_MB"),
        ({"RLHF_INFERENCE_OUTBOX_MAX_ATTEMPTS": "0"}, "RLHF_INFERENCE_OUTBOX_MAX_ATTEMPTS"),
        ({"RLHF_INFERENCE_GRPC_MAX_CONCURRENT_RPCS": "0"}, "RLHF_INFERENCE_GRPC_MAX_CONCURRENT_RPCS"),
    ]:
        with pytest.raises(ConfigError, match=name):
            load_config(InferenceConfig, env)


def test_holding_the_canary_beside_needs_adapters_on_a_stable_replica_with_room_for_three():
    on = {"RLHF_INFERENCE_LORA_ADAPTERS": "1", "RLHF_INFERENCE_LORA_CANARY_BESIDE": "1"}
    assert load_config(InferenceConfig, on).lora_canary_beside is True
    for env, message in [
        ({"RLHF_INFERENCE_LORA_CANARY_BESIDE": "1"}, "LORA_CANARY_BESIDE needs RLHF_INFERENCE_LORA_ADAPTERS=1"),
        ({**on, "RLHF_INFERENCE_FOLLOW": "canary"}, "and RLHF_INFERENCE_FOLLOW=current"),
        ({**on, "RLHF_INFERENCE_LORA_MAX_LOADED": "2"}, "RLHF_INFERENCE_LORA_MAX_LOADED=2: at least 3"),
        ({**on, "RLHF_INFERENCE_LORA_MAX_BATCH": "2"}, "RLHF_INFERENCE_LORA_MAX_BATCH=2: at least 3 (or 0)"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(InferenceConfig, env)
        assert message in str(err.value)


ENGINE_ENV = (
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "VLLM_LOGGING_LEVEL",
    "OMP_WAIT_POLICY",
)


@pytest.fixture
def engine_env(monkeypatch):
    """os.environ as configure_vllm_environment leaves it, restored after the test."""
    from services.inference.engine import configure_vllm_environment

    for name in ENGINE_ENV:
        monkeypatch.setenv(name, "before")

    def configure(env: dict[str, str]) -> dict[str, str]:
        configure_vllm_environment(load_config(InferenceConfig, env))
        import os

        return {name: os.environ[name] for name in ENGINE_ENV}

    return configure


def test_the_engine_threads_sleep_between_parallel_regions_by_default(engine_env):
    """The engine process is spawned with OMP_WAIT_POLICY=PASSIVE unless the setting says otherwise;
    empty keeps whatever the environment had."""
    assert engine_env({})["OMP_WAIT_POLICY"] == "PASSIVE"
    assert engine_env({"RLHF_INFERENCE_CPU_OMP_WAIT_POLICY": "active"})["OMP_WAIT_POLICY"] == "ACTIVE"
    assert engine_env({"RLHF_INFERENCE_CPU_OMP_WAIT_POLICY": ""})["OMP_WAIT_POLICY"] == "ACTIVE", "left as it was"


def test_an_unknown_wait_policy_is_refused_naming_the_variable():
    with pytest.raises(ConfigError, match="RLHF_INFERENCE_CPU_OMP_WAIT_POLICY='spin'"):
        load_config(InferenceConfig, {"RLHF_INFERENCE_CPU_OMP_WAIT_POLICY": "spin"})
