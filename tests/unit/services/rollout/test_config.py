"""RolloutConfig: defaults load on loopback, and each bad value is named by its variable."""

from __future__ import annotations

import base64

import pytest

from services.rollout.config import RolloutConfig
from shared.config import ConfigError, load_config

KAFKA = {"RLHF_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092"}


def test_defaults_load_and_give_the_gate_its_settings():
    cfg = load_config(RolloutConfig, KAFKA)
    g = cfg.gate_settings()
    assert (g.alpha, g.margin, g.rho, g.min_ratings, g.timeout_s) == (0.05, 0.05, 25.0, 30, 3600.0)
    assert (cfg.grpc_port, cfg.canary_share, cfg.initial_mode) == (50055, 0.1, "auto")


@pytest.mark.parametrize(
    "name,value",
    [
        ("RLHF_ROLLOUT_CANARY_SHARE", "0"),
        ("RLHF_ROLLOUT_CANARY_SHARE", "1"),
        ("RLHF_ROLLOUT_ALPHA", "1.5"),
        ("RLHF_ROLLOUT_MARGIN", "-0.1"),
        ("RLHF_ROLLOUT_RHO", "0"),
        ("RLHF_ROLLOUT_MIN_RATINGS", "0"),
        ("RLHF_ROLLOUT_MAX_LATENCY_RATIO", "0.5"),
        ("RLHF_ROLLOUT_TIMEOUT_S", "0"),
        ("RLHF_ROLLOUT_TICK_S", "0"),
        ("RLHF_ROLLOUT_INITIAL_MODE", "yolo"),
        ("RLHF_ROLLOUT_MAX_VOTES", "0"),
        ("RLHF_ROLLOUT_RECENT_STEPS", "0"),
    ],
)
def test_a_bad_value_is_named(name, value):
    with pytest.raises(ConfigError, match=name):
        load_config(RolloutConfig, {**KAFKA, name: value})


def test_kafka_is_required():
    with pytest.raises(ConfigError, match="RLHF_KAFKA_BOOTSTRAP_SERVERS"):
        load_config(RolloutConfig, {})


def test_off_loopback_it_must_sign_and_verify_the_policy_line():
    env = {**KAFKA, "RLHF_ROLLOUT_HOST": "0.0.0.0", "RLHF_AUTH_ALLOW_PLAINTEXT": "1"}
    with pytest.raises(ConfigError) as err:
        load_config(RolloutConfig, env)
    assert "RLHF_VERSIONS_POLICY_SIGNING_KEY" in str(err.value) and "RLHF_VERSIONS_POLICY_VERIFY_KEY" in str(err.value)
    key = base64.b64encode(bytes(range(32))).decode()
    from shared.signing import SigningKey

    public = base64.b64encode(SigningKey.from_bytes(key.encode(), "policy").public_raw).decode()
    cfg = load_config(
        RolloutConfig, {**env, "RLHF_VERSIONS_POLICY_SIGNING_KEY": key, "RLHF_VERSIONS_POLICY_VERIFY_KEYS": public}
    )
    assert cfg.versions.signer("policy") is not None
