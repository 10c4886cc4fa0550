"""The gateway fails closed at load: no start on a reachable host without keys unless anonymous mode is
asked for, and a malformed identity or limit setting is an error naming its variable."""

from __future__ import annotations

import pytest

from services.gateway.config import GatewayConfig, is_loopback
from services.gateway.identity import keys_file_line
from shared.config import ConfigError, load_config

KEY = "alice-key-0123456789abcdefghij"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "gateway.example", "::"])
def test_a_reachable_gateway_without_keys_refuses_to_start(host):
    with pytest.raises(ConfigError, match=f"RLHF_GATEWAY_HOST={host} is not loopback and no API keys are set"):
        load_config(GatewayConfig, {"RLHF_GATEWAY_HOST": host})


def test_a_reachable_gateway_starts_with_keys_or_with_anonymous_mode_asked_for(tmp_path):
    env = {"RLHF_GATEWAY_HOST": "0.0.0.0"}
    assert load_config(GatewayConfig, {**env, "RLHF_GATEWAY_API_KEYS": f"alice:{KEY}"}).api_keys
    keys_file = tmp_path / "keys"
    keys_file.write_text(keys_file_line("alice", KEY) + "\n")
    assert load_config(GatewayConfig, {**env, "RLHF_GATEWAY_API_KEYS_FILE": str(keys_file)}).api_keys_file
    assert load_config(GatewayConfig, {**env, "RLHF_GATEWAY_ANONYMOUS": "1"}).anonymous


def test_loopback_defaults_load_and_refuse_every_caller_later():
    cfg = load_config(GatewayConfig, {})  # no keys, anonymous off: nobody gets in (401), nothing is open
    assert cfg.host == "127.0.0.1" and not cfg.api_keys and not cfg.anonymous


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RLHF_GATEWAY_API_KEYS": ","}, "RLHF_GATEWAY_API_KEYS: entry 1 is empty"),
        ({"RLHF_GATEWAY_API_KEYS": " , "}, "RLHF_GATEWAY_API_KEYS: entry 1 is empty"),
        ({"RLHF_GATEWAY_API_KEYS": KEY}, "RLHF_GATEWAY_API_KEYS: entry 1 has no name"),
        ({"RLHF_GATEWAY_API_KEYS": "alice:short"}, "RLHF_GATEWAY_API_KEYS: the key of 'alice' is shorter"),
        ({"RLHF_GATEWAY_API_KEYS": f"a:{KEY},a:{KEY}x"}, "RLHF_GATEWAY_API_KEYS: the name 'a' appears twice"),
        ({"RLHF_GATEWAY_API_KEYS_FILE": "/nonexistent/keys"}, "RLHF_GATEWAY_API_KEYS_FILE=/nonexistent/keys"),
        ({"RLHF_GATEWAY_SESSION_SECRET": "short"}, "RLHF_GATEWAY_SESSION_SECRET must be at least 32"),
        ({"RLHF_GATEWAY_SESSION_TTL_S": "5"}, "RLHF_GATEWAY_SESSION_TTL_S=5"),
        (
            {"RLHF_GATEWAY_METRICS_ON_API_PORT": "0"},
            "RLHF_GATEWAY_METRICS_ON_API_PORT=0 needs RLHF_GATEWAY_METRICS_PORT",
        ),
        ({"RLHF_GATEWAY_CHAT_RATE_PER_MIN": "-1"}, "RLHF_GATEWAY_CHAT_RATE_PER_MIN=-1.0"),
        ({"RLHF_GATEWAY_FEEDBACK_BURST": "0"}, "RLHF_GATEWAY_FEEDBACK_BURST=0"),
        ({"RLHF_GATEWAY_RATE_LIMIT_PRINCIPALS": "0"}, "RLHF_GATEWAY_RATE_LIMIT_PRINCIPALS=0"),
    ],
)
def test_malformed_identity_and_limit_settings_name_their_variable(env, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(GatewayConfig, {**env, "RLHF_GATEWAY_ANONYMOUS": "1"})
    assert KEY not in str(err.value), "an error message must never show a key"


def test_metrics_on_their_own_port_only():
    cfg = load_config(GatewayConfig, {"RLHF_GATEWAY_METRICS_ON_API_PORT": "0", "RLHF_GATEWAY_METRICS_PORT": "9100"})
    assert not cfg.metrics_on_api_port and cfg.metrics_port == 9100


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.8.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("x", False)],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


# --- several groups of inference replicas ---------------------------------------------------------

KAFKA = {"RLHF_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092"}


def test_groups_of_replicas_and_a_canary_group_load():
    cfg = load_config(
        GatewayConfig,
        {
            **KAFKA,
            "RLHF_GATEWAY_INFERENCE_ADDRESS": "127.0.0.1:50051,127.0.0.1:50061",
            "RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS": "dns:///rlhf-inference-canary:50051",
            "RLHF_GATEWAY_SIDE_BY_SIDE": "0",
        },
    )
    assert cfg.canary_inference_address.startswith("dns:///") and not cfg.side_by_side
    assert cfg.kafka.servers == ["127.0.0.1:9092"]


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"RLHF_GATEWAY_INFERENCE_ADDRESS": "inference"},
            "RLHF_GATEWAY_INFERENCE_ADDRESS='inference': expected host:port",
        ),
        (
            {"RLHF_GATEWAY_INFERENCE_ADDRESS": "a:1,b:2"},
            "RLHF_GATEWAY_INFERENCE_ADDRESS='a:1,b:2': 'a' is not an IP address",
        ),
        (
            {**KAFKA, "RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS": "10.0.0.1:1,10.0.0.2"},
            "RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS='10.0.0.1:1,10.0.0.2': '10.0.0.2' is not host:port",
        ),
        (
            {"RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS": "127.0.0.1:50061"},
            "RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS needs RLHF_KAFKA_BOOTSTRAP_SERVERS",
        ),
        ({"RLHF_GATEWAY_ROLLOUT_ADDRESS": "rollout"}, "RLHF_GATEWAY_ROLLOUT_ADDRESS='rollout': expected host:port"),
        ({"RLHF_GATEWAY_ROLLOUT_CATCH_UP_S": "-1"}, "RLHF_GATEWAY_ROLLOUT_CATCH_UP_S=-1.0: must not be negative"),
        ({"RLHF_GATEWAY_FLYWHEEL_EVENTS": "0"}, "RLHF_GATEWAY_FLYWHEEL_EVENTS=0: expected 1 to 10000"),
    ],
)
def test_a_bad_routing_setting_is_refused_naming_its_variable(env, message):
    with pytest.raises(ConfigError) as err:
        load_config(GatewayConfig, env)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RLHF_GATEWAY_BODY_TIMEOUT_S": "0"}, "RLHF_GATEWAY_BODY_TIMEOUT_S=0.0: expected more than 0"),
        ({"RLHF_GATEWAY_HEADER_TIMEOUT_S": "nan"}, "RLHF_GATEWAY_HEADER_TIMEOUT_S=nan: expected more than 0"),
        ({"RLHF_GATEWAY_KEEP_ALIVE_S": "0"}, "RLHF_GATEWAY_KEEP_ALIVE_S=0: expected 1 to 3600"),
        ({"RLHF_GATEWAY_MAX_HEADER_BYTES": "100"}, "RLHF_GATEWAY_MAX_HEADER_BYTES=100: expected 1024 to 1048576"),
        ({"RLHF_GATEWAY_MAX_CONCURRENCY": "0"}, "RLHF_GATEWAY_MAX_CONCURRENCY=0: must be at least 8"),
        ({"RLHF_GATEWAY_FEEDBACK_QUEUE_MAX": "0"}, "RLHF_GATEWAY_FEEDBACK_QUEUE_MAX=0: must be at least 1"),
    ],
)
def test_a_bad_bound_is_refused_naming_its_variable(env, message):
    with pytest.raises(ConfigError) as err:
        load_config(GatewayConfig, env)
    assert message in str(err.value)
