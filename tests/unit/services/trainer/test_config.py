"""TrainerConfig: defaults load, the chart's variables exist, bad values are named at start."""

from __future__ import annotations

import pytest
import torch

from services.trainer.config import TrainerConfig
from shared.config import ConfigError, env_vars, load_config


def test_defaults_are_valid_and_ports_match_the_chart():
    cfg = load_config(TrainerConfig, {})
    assert (cfg.grpc_port, cfg.metrics_port) == (50054, 9104)
    assert cfg.prompt_file.is_file() and cfg.ppo.temperature == 1.0
    names = {v.name for v in env_vars(TrainerConfig)}
    assert {
        "RLHF_TRAINER_INFERENCE_ADDRESS",
        "RLHF_TRAINER_REWARD_ADDRESS",
        "RLHF_TRAINER_KL_BOUND",
        "RLHF_PPO_LR",
        "RLHF_KAFKA_BOOTSTRAP_SERVERS",
        "RLHF_MODEL_STORE_ROOT",
    } <= names


@pytest.mark.parametrize(
    "env, words",
    [
        ({"RLHF_TRAINER_LIVE_PROMPT_FRACTION": "1.5"}, "LIVE_PROMPT_FRACTION"),
        ({"RLHF_TRAINER_MAX_PRINCIPAL_SHARE": "0"}, "RLHF_TRAINER_MAX_PRINCIPAL_SHARE"),
        ({"RLHF_TRAINER_MIN_PRINCIPAL_PROMPTS": "0"}, "RLHF_TRAINER_MIN_PRINCIPAL_PROMPTS"),
        ({"RLHF_TRAINER_INFERENCE_ADDRESS": "nohost"}, "INFERENCE_ADDRESS"),
        ({"RLHF_TRAINER_PROMPT_FILE": "/nonexistent.jsonl"}, "PROMPT_FILE"),
        ({"RLHF_TRAINER_ROLLOUTS_PER_ITERATION": "0"}, "ROLLOUTS_PER_ITERATION"),
        ({"RLHF_TRAINER_MAX_STALENESS_STEPS": "-1"}, "MAX_STALENESS_STEPS"),
        ({"RLHF_TRAINER_REVERT_AFTER_REFUSALS": "-1"}, "REVERT_AFTER_REFUSALS"),
        ({"RLHF_TRAINER_KL_BOUND": "-1"}, "KL_BOUND"),
        ({"RLHF_PPO_TEMPERATURE": "0.7"}, "RLHF_PPO_TEMPERATURE must be 1.0"),
        ({"RLHF_TRAINER_KL_BOUDN": "3"}, "unknown setting"),
        ({"RLHF_TRAINER_HELDOUT_SAMPLES": "-1"}, "RLHF_TRAINER_HELDOUT_SAMPLES must not be negative"),
        ({"RLHF_TRAINER_HELDOUT_SAMPLES": "65"}, "RLHF_TRAINER_HELDOUT_SAMPLES must be at most 64"),
        ({"RLHF_TRAINER_GUARDS": "frozen_rm:rm-0001"}, "RLHF_TRAINER_GUARDS: 'frozen_rm:rm-0001': expected"),
        ({"RLHF_TRAINER_GUARDS": "oracle:rm-0001:0.1"}, "RLHF_TRAINER_GUARDS: .*unknown guard kind"),
        (
            {"RLHF_TRAINER_GUARDS": "entry:no_such_module_for_rlhf:sums:0.8"},
            "RLHF_TRAINER_GUARDS: entry:no_such_module_for_rlhf:sums: cannot import no_such_module_for_rlhf",
        ),
        ({"RLHF_TRAINER_GUARDS": "entry:json:no_such_function:0.8"}, "RLHF_TRAINER_GUARDS: .*no function"),
        ({"RLHF_TRAINER_YIELD_USER_IN_FLIGHT": "-1"}, "RLHF_TRAINER_YIELD_USER_IN_FLIGHT must not be negative"),
        ({"RLHF_TRAINER_YIELD_USER_TTFT_S": "-0.5"}, "RLHF_TRAINER_YIELD_USER_TTFT_S must not be negative"),
        ({"RLHF_TRAINER_YIELD_RESUME_FRACTION": "1"}, "RLHF_TRAINER_YIELD_RESUME_FRACTION must be in \\[0, 1\\)"),
        ({"RLHF_TRAINER_YIELD_POLL_S": "0"}, "RLHF_TRAINER_YIELD_POLL_S must be positive"),
        ({"RLHF_TRAINER_IDLE_BUDGET": "1.5"}, "RLHF_TRAINER_IDLE_BUDGET must be in \\[0, 1\\]"),
        ({"RLHF_TRAINER_IDLE_AFTER_S": "-1"}, "RLHF_TRAINER_IDLE_AFTER_S must not be negative"),
    ],
)
def test_bad_values_are_named(env, words):
    with pytest.raises(ConfigError, match=words):
        load_config(TrainerConfig, env)


def test_guards_parse_once_into_specs():
    cfg = load_config(TrainerConfig, {"RLHF_TRAINER_GUARDS": "frozen_rm:rm-0001:0.05,entry:json:dumps:0.8:0.1"})
    assert [(s.kind, s.target, s.threshold, s.tolerance) for s in cfg.guard_specs()] == [
        ("frozen_rm", "rm-0001", 0.05, 0.0),
        ("entry", "json:dumps", 0.8, 0.1),
    ]
    assert load_config(TrainerConfig, {}).heldout_samples == 4


def test_rollout_mode_is_off_unless_set():
    from services.trainer.config import TrainerConfig
    from shared.config import load_config

    assert load_config(TrainerConfig, {}).rollout is False
    assert load_config(TrainerConfig, {"RLHF_TRAINER_ROLLOUT": "1"}).rollout is True


def test_the_yield_settings_default_to_yielding_and_an_idle_budget():
    s = load_config(TrainerConfig, {}).yield_settings()
    assert s.enabled and (s.user_in_flight, s.user_waiting, s.user_ttft_s, s.idle_budget) == (6, 4, 1.0, 0.25)
    off = load_config(
        TrainerConfig,
        {
            "RLHF_TRAINER_YIELD_USER_IN_FLIGHT": "0",
            "RLHF_TRAINER_YIELD_USER_WAITING": "0",
            "RLHF_TRAINER_YIELD_USER_TTFT_S": "0",
            "RLHF_TRAINER_IDLE_BUDGET": "1",
        },
    )
    assert not off.yield_settings().enabled


def test_lora_and_memory_switches_parse_into_model_settings():
    default = load_config(TrainerConfig, {}).model_settings()
    assert (default.policy_mode, default.value_model, default.device, default.precision) == (
        "full",
        "reward_model",
        "cpu",
        "auto",
    )
    assert default.autocast_dtype() is None  # float32 stays the CPU default
    cfg = load_config(
        TrainerConfig,
        {
            "RLHF_TRAINER_POLICY_MODE": "lora",
            "RLHF_TRAINER_LORA_RANK": "16",
            "RLHF_TRAINER_LORA_ALPHA": "32",
            "RLHF_TRAINER_LORA_DROPOUT": "0.05",
            "RLHF_TRAINER_LORA_TARGET_MODULES": "q_proj, v_proj",
            "RLHF_TRAINER_VALUE_MODEL": "policy_head",
            "RLHF_TRAINER_PRECISION": "bf16",
            "RLHF_TRAINER_GRADIENT_CHECKPOINTING": "1",
        },
    )
    s = cfg.model_settings()
    assert s.lora_enabled and (s.lora.rank, s.lora.alpha, s.lora.dropout) == (16, 32.0, 0.05)
    assert s.lora.target_modules == ("q_proj", "v_proj")
    assert (s.value_model, s.gradient_checkpointing, s.autocast_dtype()) == ("policy_head", True, torch.bfloat16)
    assert s.problems() == []


@pytest.mark.parametrize(
    "env, words",
    [
        ({"RLHF_TRAINER_POLICY_MODE": "qlora"}, "RLHF_TRAINER_POLICY_MODE='qlora': expected one of full, lora"),
        ({"RLHF_TRAINER_VALUE_MODEL": "shared"}, "RLHF_TRAINER_VALUE_MODEL='shared'"),
        ({"RLHF_TRAINER_PRECISION": "fp8"}, "RLHF_TRAINER_PRECISION='fp8'"),
        ({"RLHF_TRAINER_DEVICE": "tpu"}, "RLHF_TRAINER_DEVICE: device 'tpu'"),
        ({"RLHF_TRAINER_DEVICE": "cuda:7"}, "RLHF_TRAINER_DEVICE: device 'cuda:7': 0 CUDA device"),
        ({"RLHF_TRAINER_LORA_RANK": "0"}, "RLHF_TRAINER_LORA_RANK must be at least 1"),
        ({"RLHF_TRAINER_LORA_ALPHA": "0"}, "RLHF_TRAINER_LORA_ALPHA must be positive"),
        ({"RLHF_TRAINER_LORA_DROPOUT": "1"}, "RLHF_TRAINER_LORA_DROPOUT must be in"),
        ({"RLHF_TRAINER_LORA_TARGET_MODULES": "q_proj,v-proj"}, "RLHF_TRAINER_LORA_TARGET_MODULES must be"),
    ],
)
def test_bad_model_settings_are_named(env, words):
    with pytest.raises(ConfigError, match=words):
        load_config(TrainerConfig, env)


def test_checkpoints_live_inside_the_model_store_unless_configured(tmp_path):
    from pathlib import Path

    from services.trainer.config import TrainerConfig
    from shared.config import ModelStoreConfig, load_config

    cfg = load_config(TrainerConfig, {}, model_store=ModelStoreConfig(tmp_path / "models"))
    assert cfg.checkpoint_root() == tmp_path / "models" / ".state" / "trainer" / "checkpoints"
    cfg = load_config(TrainerConfig, {"RLHF_TRAINER_CHECKPOINT_DIR": "/ckpt"})
    assert cfg.checkpoint_root() == Path("/ckpt")


def test_the_default_lora_targets_are_every_linear_layer_of_a_llama_block():
    from services.trainer.models import LLAMA_LORA_TARGETS

    assert load_config(TrainerConfig, {}).lora_target_modules == LLAMA_LORA_TARGETS
