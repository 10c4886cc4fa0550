"""`rlhf up` settings: which services, and what to do with an empty model store, are checked at start."""

import base64
import os

import pytest

from flywheel.launcher import ALL_SERVICES, UpConfig
from shared.config import ConfigError, load_config
from shared.signing import SigningKey


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


def test_the_gateway_gets_a_local_key_by_hash_and_anonymous_sessions_on_loopback_only(tmp_path):
    from pathlib import Path

    from flywheel.launcher import Stack
    from services.gateway.config import GatewayConfig

    key_file = tmp_path / "gateway-api-key"
    cfg = load_config(UpConfig, {"RLHF_UP_GATEWAY_KEY_FILE": str(key_file)})
    stack = Stack(cfg, {})
    stack._gateway_identity()
    key = key_file.read_text().strip()
    assert stack.gateway_key == key and len(key) >= 32 and key_file.stat().st_mode & 0o777 == 0o600
    hashed = stack.environ["RLHF_GATEWAY_API_KEYS_FILE"]
    assert key not in Path(hashed).read_text() and stack.environ["RLHF_GATEWAY_ANONYMOUS"] == "1"
    gateway = load_config(GatewayConfig, stack.environ)
    from services.gateway.identity import load_keyring

    assert load_keyring(gateway.api_keys, gateway.api_keys_file).principal(key.encode()) == "local"

    again = Stack(cfg, {"RLHF_GATEWAY_HOST": "0.0.0.0"})
    again._gateway_identity()
    assert again.gateway_key == key, "the key is kept across runs"
    assert "RLHF_GATEWAY_ANONYMOUS" not in again.environ, "anonymous sessions only on loopback"

    configured = Stack(cfg, {"RLHF_GATEWAY_API_KEYS_FILE": "/etc/keys", "RLHF_GATEWAY_ANONYMOUS": "0"})
    configured._gateway_identity()
    assert configured.environ["RLHF_GATEWAY_API_KEYS_FILE"] == "/etc/keys" and not configured.gateway_key
    assert configured.environ["RLHF_GATEWAY_ANONYMOUS"] == "0", "what is configured wins"


def test_the_version_keys_are_made_once_and_given_to_every_service(tmp_path):
    from flywheel.launcher import Stack
    from shared.config import VersionTrustConfig

    cfg = load_config(UpConfig, {}, keys_dir=tmp_path / "keys")
    stack = Stack(cfg, environ={})
    stack._make_signing_keys()
    assert (tmp_path / "keys" / "policy-signing.pem").stat().st_mode & 0o777 == 0o600
    trust = load_config(VersionTrustConfig, stack.environ)
    for line in ("policy", "rm"):
        key_id = stack.signers[line].key_id
        assert trust.signer(line).key_id == key_id and key_id in trust.verify_keys(line).key_ids
    # The policy line's followers also trust the rollout service (it moves the current and canary pointers).
    assert sorted(trust.verify_keys("policy").key_ids) == sorted(
        [stack.signers["policy"].key_id, stack.signers["rollout"].key_id]
    )
    assert trust.verify_keys("rm").key_ids == [stack.signers["rm"].key_id]
    assert stack.signers["policy"].key_id != stack.signers["rm"].key_id  # one key pair per line
    again = Stack(cfg, environ={})
    again._make_signing_keys()  # a second start keeps the keys
    assert again.signers["policy"].key_id == stack.signers["policy"].key_id


def test_each_run_makes_grpc_credentials_every_service_accepts(tmp_path):
    """rlhf up: fresh tokens per caller, their hashes accepted everywhere (besides any given), each
    caller's own token only in its process, the operator's in a file only its user can read."""
    from flywheel.launcher import Stack
    from shared.config import ServiceAuthConfig, credential_entry, token_digest

    extra = credential_entry("monitoring", "m" * 30)
    environ = {
        "RLHF_UP_OPERATOR_TOKEN_FILE": str(tmp_path / "var" / "operator-token"),
        "RLHF_AUTH_ACCEPT": extra,
        "RLHF_AUTH_TOKEN": "x" * 30,  # a stray shared token must not reach every process
    }
    stack = Stack(load_config(UpConfig, environ), environ)
    stack._make_credentials()
    tokens = stack.tokens
    assert set(tokens) == {"gateway", "trainer", "operator", "monitoring"}
    assert len(set(tokens.values())) == 4 and all(len(t) >= 32 for t in tokens.values())
    accepted = load_config(ServiceAuthConfig, stack.environ).accepted_callers()
    assert {token_digest(t): name for name, t in tokens.items()}.items() <= accepted.items()
    assert extra in stack.environ["RLHF_AUTH_ACCEPT"] and "RLHF_AUTH_TOKEN" not in stack.environ
    token_file = tmp_path / "var" / "operator-token"
    assert token_file.read_text().strip() == tokens["operator"]
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert stack.credentials("operator").token == tokens["operator"]
    # A new run, new tokens: one leaked from an earlier run opens nothing.
    again = Stack(load_config(UpConfig, environ), environ)
    again._make_credentials()
    assert not set(again.tokens.values()) & set(tokens.values())


def test_a_given_operator_token_is_kept(tmp_path):
    from flywheel.launcher import Stack

    environ = {"RLHF_UP_OPERATOR_TOKEN_FILE": str(tmp_path / "op"), "RLHF_OPERATOR_TOKEN": "o" * 30}
    stack = Stack(load_config(UpConfig, environ), environ)
    stack._make_credentials()
    assert stack.tokens["operator"] == "o" * 30 == (tmp_path / "op").read_text().strip()


def test_with_rollout_the_rollout_service_signs_with_its_own_key_that_followers_trust(tmp_path):
    from flywheel.launcher import Stack
    from shared.config import VersionTrustConfig

    cfg = load_config(UpConfig, {}, keys_dir=tmp_path / "keys")
    assert cfg.rollout, "rollout is on by default"
    operators = SigningKey.generate()  # the policy keys an operator configured (e.g. their trainer's)
    given = base64.b64encode(operators.public_raw).decode()
    stack = Stack(cfg, environ={"RLHF_VERSIONS_POLICY_VERIFY_KEYS": given})
    stack._make_signing_keys()
    assert (tmp_path / "keys" / "rollout-signing.pem").stat().st_mode & 0o777 == 0o600
    rollout, trainer = stack.signers["rollout"], stack.signers["policy"]
    assert rollout.key_id != trainer.key_id
    trusted = load_config(VersionTrustConfig, stack.environ).verify_keys("policy").key_ids
    assert sorted(trusted) == sorted([operators.key_id, rollout.key_id])  # the rollout key added to theirs
    again = Stack(cfg, environ=dict(stack.environ))
    again._make_signing_keys()  # kept, and not listed twice
    assert again.signers["rollout"].key_id == rollout.key_id
    assert again.environ["RLHF_VERSIONS_POLICY_VERIFY_KEYS"] == stack.environ["RLHF_VERSIONS_POLICY_VERIFY_KEYS"]


def rollout_stack(tmp_path, **environ):
    from flywheel.launcher import Stack

    env = {
        "RLHF_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
        "RLHF_FEEDBACK_TOKEN_SECRET": "s" * 32,
        "RLHF_UP_OPERATOR_TOKEN_FILE": str(tmp_path / "op"),
        "RLHF_UP_GATEWAY_KEY_FILE": str(tmp_path / "gw"),
        "RLHF_UP_KEYS_DIR": str(tmp_path / "keys"),
        **environ,
    }
    stack = Stack(load_config(UpConfig, env), env)
    stack._make_signing_keys()
    stack._make_credentials()
    return stack


def test_with_rollout_a_canary_engine_and_the_rollout_service_are_planned_and_wired(tmp_path):
    from services.gateway.config import GatewayConfig
    from services.inference.config import InferenceConfig
    from services.rollout.config import RolloutConfig
    from services.trainer.config import TrainerConfig

    stack = rollout_stack(tmp_path)
    planned = {svc.name: svc for svc in stack.plan()}
    assert list(planned) == ["inference", "inference-canary", "reward", "feedback", "rollout", "trainer", "gateway"]
    canary = load_config(InferenceConfig, {**stack.environ, **planned["inference-canary"].env})
    stable = load_config(InferenceConfig, {**stack.environ, **planned["inference"].env})
    assert (canary.follow, stable.follow) == ("canary", "current") and canary.grpc_port == 50061 != stable.grpc_port
    assert canary.metrics_port != stable.metrics_port
    rollout = load_config(RolloutConfig, {**stack.environ, **planned["rollout"].env})
    assert rollout.versions.signer("policy").key_id == stack.signers["rollout"].key_id
    assert load_config(TrainerConfig, stack.environ).rollout is True
    gateway = load_config(GatewayConfig, stack.environ)
    assert gateway.canary_inference_address == planned["inference-canary"].endpoints["gRPC"] == "127.0.0.1:50061"
    assert planned["rollout"].endpoints["gRPC"] == "127.0.0.1:50055"


def test_without_rollout_nothing_of_it_is_started(tmp_path):
    from services.gateway.config import GatewayConfig
    from services.trainer.config import TrainerConfig

    stack = rollout_stack(tmp_path, RLHF_UP_ROLLOUT="0")
    assert [svc.name for svc in stack.plan()] == ["inference", "reward", "feedback", "trainer", "gateway"]
    assert load_config(TrainerConfig, stack.environ).rollout is False
    assert load_config(GatewayConfig, stack.environ).canary_inference_address == ""
    assert "rollout" not in stack.signers


def test_a_lora_trainer_gets_engines_that_serve_adapters(tmp_path):
    from services.inference.config import InferenceConfig

    stack = rollout_stack(tmp_path, RLHF_TRAINER_POLICY_MODE="lora")
    planned = {svc.name: svc for svc in stack.plan()}
    for name in ("inference", "inference-canary"):
        assert load_config(InferenceConfig, {**stack.environ, **planned[name].env}).lora_adapters is True
    full = rollout_stack(tmp_path / "full")
    full.plan()
    assert load_config(InferenceConfig, full.environ).lora_adapters is False


def test_a_canary_port_that_is_the_stable_engines_is_refused(tmp_path):
    stack = rollout_stack(tmp_path, RLHF_UP_CANARY_GRPC_PORT="50051")
    with pytest.raises(ConfigError, match="RLHF_UP_CANARY_GRPC_PORT=50051"):
        stack.plan()


# --- supervision and the embedded broker ---------------------------------------------------------


def test_supervision_and_broker_settings_default_and_are_checked():
    cfg = load_config(UpConfig, {})
    assert (cfg.broker_sha256, cfg.metrics_port) == ("", 9110)
    policy = cfg.restart_policy()
    assert (policy.max_restarts, policy.window_s, policy.initial_backoff_s, policy.max_backoff_s) == (5, 300, 1, 30)
    for env, message in (
        ({"RLHF_UP_BROKER_SHA256": "abc"}, "RLHF_UP_BROKER_SHA256 must be 64 hex digits"),
        ({"RLHF_UP_RESTART_MAX": "-1"}, "RLHF_UP_RESTART_MAX must be >= 0"),
        ({"RLHF_UP_RESTART_WINDOW_S": "0"}, "RLHF_UP_RESTART_WINDOW_S must be > 0"),
        ({"RLHF_UP_RESTART_BACKOFF_S": "60"}, "RLHF_UP_RESTART_BACKOFF_S must be > 0 and at most"),
        ({"RLHF_UP_METRICS_PORT": "70000"}, "RLHF_UP_METRICS_PORT must be a port number"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(UpConfig, env)
    assert load_config(UpConfig, {"RLHF_UP_BROKER_SHA256": "AB" * 32}).broker_sha256 == "AB" * 32


def test_a_tampered_broker_binary_stops_rlhf_up_before_anything_starts(tmp_path):
    from flywheel.launcher import Stack
    from shared.kafka.embedded import BrokerError

    # A digest that is not the installed binary's: the check refuses it, no broker process is started.
    stack = Stack(load_config(UpConfig, {"RLHF_UP_BROKER_SHA256": "0" * 64}), {})
    with pytest.raises(BrokerError, match="refusing to run it"):
        stack.start()
    assert stack.broker is None and stack.services == []
