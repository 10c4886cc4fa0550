"""PPOConfig: environment variables, documentation of every field, validation."""

from __future__ import annotations

import dataclasses

import pytest

from services.trainer.ppo_config import PPOConfig
from shared.config import ConfigError, field_docs, load_config


def test_defaults_are_valid_and_every_field_is_documented():
    assert PPOConfig().problems() == []
    docs = field_docs(PPOConfig)
    assert {f.name for f in dataclasses.fields(PPOConfig)} <= docs.keys()


def test_loads_from_environment():
    cfg = load_config(
        PPOConfig,
        {
            "RLHF_PPO_LR": "3e-4",
            "RLHF_PPO_ADAPTIVE_KL": "1",
            "RLHF_PPO_PTX_COEF": "0.5",
            "RLHF_PPO_KL_ESTIMATOR": "k3",
            "RLHF_PPO_SCORE_CLIP": "5",
        },
    )
    assert (cfg.lr, cfg.adaptive_kl, cfg.ptx_coef, cfg.kl_estimator, cfg.score_clip) == (3e-4, True, 0.5, "k3", 5.0)
    assert cfg.effective_value_lr == 3e-4


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"RLHF_PPO_LR": "0"}, "RLHF_PPO_LR"),
        ({"RLHF_PPO_CLIP_RANGE": "1.5"}, "RLHF_PPO_CLIP_RANGE"),
        ({"RLHF_PPO_LAM": "2"}, "RLHF_PPO_LAM"),
        ({"RLHF_PPO_KL_ESTIMATOR": "k7"}, "RLHF_PPO_KL_ESTIMATOR"),
        ({"RLHF_PPO_ADAPTIVE_KL": "1", "RLHF_PPO_TARGET_KL": "0"}, "RLHF_PPO_ADAPTIVE_KL"),
        ({"RLHF_PPO_PTX_COEF": "1", "RLHF_PPO_PTX_FILE": "/nonexistent/corpus.txt"}, "RLHF_PPO_PTX_FILE"),
        ({"RLHF_PPO_EPOCHS": "0"}, "RLHF_PPO_EPOCHS"),
        ({"RLHF_PPO_MINIBATCH_SIZ": "4"}, "unknown setting"),
    ],
)
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(PPOConfig, env)
