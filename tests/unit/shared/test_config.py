from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from services.gateway.config import GatewayConfig
from services.inference.config import InferenceConfig
from shared.config import ConfigBase, ConfigError, KafkaConfig, env_vars, field_docs, format_env_table, load_config


@dataclass(frozen=True)
class _Demo(ConfigBase):
    ENV_PREFIX: ClassVar[str] = "DEMO_"

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    """Nested."""
    port: int = 1
    """The port."""
    ratio: float = 0.5
    """A ratio."""
    on: bool = False
    """A switch."""
    name: str | None = None
    """Optional name."""
    tags: tuple[str, ...] = ("a",)
    """Tags."""
    path: Path = Path("x")
    """A path."""

    def problems(self) -> list[str]:
        return ["DEMO_PORT must be positive"] if self.port <= 0 else []


def test_defaults_without_environment():
    cfg = load_config(_Demo, {})
    assert (cfg.port, cfg.ratio, cfg.on, cfg.name, cfg.tags, cfg.path) == (1, 0.5, False, None, ("a",), Path("x"))
    assert cfg.kafka == KafkaConfig()


def test_every_type_parses_from_environment():
    env = {
        "DEMO_PORT": "80",
        "DEMO_RATIO": "0.25",
        "DEMO_ON": "yes",
        "DEMO_NAME": "n",
        "DEMO_TAGS": "x, y,",
        "DEMO_PATH": "/tmp/p",
        "RLHF_KAFKA_BOOTSTRAP_SERVERS": "h1:9092,h2:9093",
    }
    cfg = load_config(_Demo, env)
    assert (cfg.port, cfg.ratio, cfg.on, cfg.name, cfg.tags, cfg.path) == (
        80,
        0.25,
        True,
        "n",
        ("x", "y"),
        Path("/tmp/p"),
    )
    assert cfg.kafka.servers == ["h1:9092", "h2:9093"]


def test_bad_values_are_all_named_in_one_error():
    with pytest.raises(ConfigError) as err:
        load_config(_Demo, {"DEMO_PORT": "eighty", "DEMO_ON": "maybe", "DEMO_RATIO": "x"})
    text = str(err.value)
    assert "DEMO_PORT='eighty': expected an integer" in text
    assert "DEMO_ON='maybe': expected a boolean" in text
    assert "DEMO_RATIO='x': expected a number" in text


def test_cross_field_problems_and_nested_problems_are_reported():
    with pytest.raises(ConfigError, match="DEMO_PORT must be positive"):
        load_config(_Demo, {"DEMO_PORT": "0"})
    with pytest.raises(ConfigError, match="is not host:port"):
        load_config(_Demo, {"RLHF_KAFKA_BOOTSTRAP_SERVERS": "nohostport"})


def test_misspelled_variable_with_service_prefix_is_refused():
    with pytest.raises(ConfigError, match="DEMO_PROT: unknown setting"):
        load_config(_Demo, {"DEMO_PROT": "80"})


def test_misspelled_variable_of_a_nested_section_is_refused():
    # A typo in a section's variable (RLHF_KAFKA_*, RLHF_PPO_* in the trainer) would otherwise be ignored silently.
    with pytest.raises(ConfigError, match="RLHF_KAFKA_BOOTSTRAP_SERVER: unknown setting"):
        load_config(_Demo, {"RLHF_KAFKA_BOOTSTRAP_SERVER": "localhost:9092"})
    assert load_config(_Demo, {"RLHF_KAFKA_BOOTSTRAP_SERVERS": "localhost:9092"}).kafka.servers


def test_overrides_win_over_environment():
    assert load_config(_Demo, {"DEMO_PORT": "80"}, port=81).port == 81


def test_docstrings_under_fields_are_the_documentation():
    docs = field_docs(_Demo)
    assert docs["port"] == "The port."
    table = format_env_table(_Demo)
    assert "| `DEMO_PORT` | int | `1` | The port. |" in table
    assert "`RLHF_KAFKA_BOOTSTRAP_SERVERS`" in table


@pytest.mark.parametrize("cls", [InferenceConfig, GatewayConfig])
def test_service_configs_load_with_defaults_and_document_every_field(cls):
    load_config(cls, {})
    for var in env_vars(cls):
        assert var.doc, f"{var.name} has no docstring"


def test_inference_limits_are_checked():
    with pytest.raises(ConfigError, match="MAX_TOKENS_LIMIT must be below"):
        load_config(InferenceConfig, {"RLHF_INFERENCE_MAX_TOKENS_LIMIT": "4096"})
    with pytest.raises(ConfigError, match="DTYPE"):
        load_config(InferenceConfig, {"RLHF_INFERENCE_DTYPE": "int3"})


# --- service-to-service credentials (RLHF_AUTH_*, RLHF_OPERATOR_*) ----------------------------------

from shared.config import (  # noqa: E402 - grouped with the tests that use them
    MIN_TOKEN_CHARS,
    OperatorConfig,
    ServiceAuthConfig,
    credential_entry,
    is_loopback,
    parse_accepted,
    token_digest,
    token_problem,
)

GOOD = "g" * MIN_TOKEN_CHARS


def test_credential_entry_is_the_name_and_the_tokens_sha256():
    import hashlib

    assert credential_entry("gateway", "tok") == "gateway:" + hashlib.sha256(b"tok").hexdigest()
    assert token_digest("tok") == hashlib.sha256(b"tok").digest()


def test_parse_accepted():
    accepted, problems = parse_accepted(
        [credential_entry("gateway", "a"), " ", "# a comment", credential_entry("operator", "b")], "V"
    )
    assert problems == [] and accepted == {token_digest("a"): "gateway", token_digest("b"): "operator"}
    # Rotation: one name, two credentials.
    both, problems = parse_accepted([credential_entry("operator", "a"), credential_entry("operator", "b")], "V")
    assert problems == [] and set(both.values()) == {"operator"} and len(both) == 2
    _, problems = parse_accepted(["gateway:" + "a" * 63, "justaname", "Gateway:" + "a" * 64], "V")
    assert len(problems) == 3 and all(p.startswith("V: ") for p in problems)
    assert "justaname" in problems[1] and "must be lower-case" in problems[2]
    _, problems = parse_accepted([credential_entry("gateway", "same"), credential_entry("trainer", "same")], "V")
    assert problems == ["V: 'trainer' has the same credential as 'gateway'"]
    # A malformed entry never echoes what follows the name (it may be a pasted token).
    _, problems = parse_accepted(["operator:the-secret-token"], "V")
    assert "the-secret-token" not in problems[0]


def test_token_problem():
    assert token_problem(GOOD, "V") is None
    assert "at least" in token_problem("short", "V")
    assert "printable ASCII" in token_problem("with space " + GOOD, "V")
    assert "printable ASCII" in token_problem("é" + GOOD, "V")


def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.0.0.1", "rlhf-inference", "::"]))


def test_auth_settings_are_validated_with_their_variable():
    with pytest.raises(ConfigError) as err:
        load_config(
            InferenceConfig,
            {
                "RLHF_AUTH_TOKEN": "short",
                "RLHF_AUTH_ACCEPT": "gateway:nothex",
                "RLHF_AUTH_TLS_CERT_FILE": "/x/tls.crt",
                "RLHF_AUTH_TLS_CLIENT_AUTH": "1",
            },
        )
    text = str(err.value)
    for fragment in (
        "RLHF_AUTH_TOKEN: a token has at least",
        "RLHF_AUTH_ACCEPT: 'gateway:...'",
        "RLHF_AUTH_TLS_CERT_FILE and RLHF_AUTH_TLS_KEY_FILE go together",
        "RLHF_AUTH_TLS_CLIENT_AUTH needs",
    ):
        assert fragment in text
    with pytest.raises(ConfigError, match="RLHF_AUTH_UNKNOWN: unknown setting"):
        load_config(InferenceConfig, {"RLHF_AUTH_UNKNOWN": "1"})


def test_a_grpc_server_off_loopback_needs_tls_or_an_explicit_plaintext_network():
    with pytest.raises(ConfigError, match="RLHF_INFERENCE_HOST=0.0.0.0: a gRPC server off loopback needs TLS"):
        load_config(InferenceConfig, {"RLHF_INFERENCE_HOST": "0.0.0.0"})

    def plaintext_problem(cfg) -> bool:
        return any("off loopback needs TLS" in p for p in cfg.problems())

    tls = ServiceAuthConfig(tls_cert_file=Path("/c"), tls_key_file=Path("/k"))
    assert not plaintext_problem(InferenceConfig(host="0.0.0.0", auth=tls))
    assert not plaintext_problem(InferenceConfig(host="0.0.0.0", auth=ServiceAuthConfig(allow_plaintext=True)))
    assert plaintext_problem(InferenceConfig(host="10.0.0.7"))
    # The gateway serves no gRPC: its host is not the concern of this rule.
    assert not plaintext_problem(GatewayConfig(host="0.0.0.0"))


def test_accepted_callers_from_the_setting_and_the_file(tmp_path):
    path = tmp_path / "accepted"
    path.write_text(f"# operators\n{credential_entry('operator', 'o' * 30)}\n")
    auth = ServiceAuthConfig(accept=(credential_entry("gateway", GOOD),), accept_file=path)
    assert sorted(auth.accepted_callers().values()) == ["gateway", "operator"]
    path.write_text("operator:bad\n")
    with pytest.raises(ConfigError, match="RLHF_AUTH_ACCEPT_FILE"):
        auth.accepted_callers()
    with pytest.raises(ConfigError, match="RLHF_AUTH_ACCEPT_FILE=.*cannot read it"):
        ServiceAuthConfig(accept_file=tmp_path / "missing").accepted_callers()


def test_own_token_from_a_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(GOOD + "\n")
    assert ServiceAuthConfig(token_file=path).own_token() == GOOD
    path.write_text("")
    with pytest.raises(ConfigError, match="RLHF_AUTH_TOKEN_FILE=.*empty"):
        ServiceAuthConfig(token_file=path).own_token()
    with pytest.raises(ConfigError, match="set one of RLHF_AUTH_TOKEN and RLHF_AUTH_TOKEN_FILE"):
        load_config(ServiceAuthConfig, {"RLHF_AUTH_TOKEN": GOOD, "RLHF_AUTH_TOKEN_FILE": str(path)})


def test_operator_token_prefers_the_setting_then_the_file(tmp_path):
    path = tmp_path / "operator-token"
    assert OperatorConfig(token_file=path).own_token() == ""
    path.write_text("f" * 30)
    assert OperatorConfig(token_file=path).own_token() == "f" * 30
    assert OperatorConfig(token=GOOD, token_file=path).own_token() == GOOD


# --- Kafka security settings -------------------------------------------------------------------------


def test_kafka_security_settings_are_validated():
    def problems(**env: str) -> str:
        with pytest.raises(ConfigError) as err:
            load_config(KafkaConfig, {f"RLHF_KAFKA_{k.upper()}": v for k, v in env.items()})
        return str(err.value)

    assert "RLHF_KAFKA_SECURITY_PROTOCOL='TLS': expected one of" in problems(security_protocol="TLS")
    text = problems(security_protocol="SASL_SSL", sasl_mechanism="GSSAPI")
    assert "RLHF_KAFKA_SASL_MECHANISM='GSSAPI'" in text and "RLHF_KAFKA_SASL_USERNAME must be set" in text
    assert "exactly one of RLHF_KAFKA_SASL_PASSWORD and RLHF_KAFKA_SASL_PASSWORD_FILE" in text
    assert "sends the password in the clear" in problems(
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p"
    )
    assert "uses no SASL" in problems(sasl_username="u")
    assert "uses no TLS" in problems(ssl_ca_file="/ca.crt")
    assert "go together" in problems(security_protocol="SSL", ssl_cert_file="/c")
    ok = load_config(
        KafkaConfig,
        {
            "RLHF_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "RLHF_KAFKA_SASL_USERNAME": "rlhf-feedback",
            "RLHF_KAFKA_SASL_PASSWORD_FILE": "/etc/rlhf/kafka-user/password",
            "RLHF_KAFKA_SSL_CA_FILE": "/etc/rlhf/kafka-ca/ca.crt",
        },
    )
    assert ok.uses_tls and ok.uses_sasl and ok.sasl_mechanism == "SCRAM-SHA-512"


def test_kafka_password_file(tmp_path):
    path = tmp_path / "password"
    path.write_text("s3cret\n")
    cfg = KafkaConfig(security_protocol="SASL_SSL", sasl_username="u", sasl_password_file=path)
    assert cfg.sasl_password_value() == "s3cret"
    with pytest.raises(ConfigError, match="RLHF_KAFKA_SASL_PASSWORD_FILE"):
        KafkaConfig(sasl_password_file=tmp_path / "missing").sasl_password_value()


# --- version signing keys (VersionTrustConfig) ----------------------------------------------------


def test_version_keys_load_from_files_and_values_and_bad_ones_name_the_variable(tmp_path):
    import base64

    from shared.config import VersionTrustConfig
    from shared.signing import write_key_pair

    key = write_key_pair(tmp_path / "policy.pem", tmp_path / "policy.pub")
    cfg = load_config(
        VersionTrustConfig,
        {
            "RLHF_VERSIONS_POLICY_SIGNING_KEY_FILE": str(tmp_path / "policy.pem"),
            "RLHF_VERSIONS_POLICY_VERIFY_KEY_FILE": str(tmp_path / "policy.pub"),
            "RLHF_VERSIONS_RM_VERIFY_KEYS": base64.b64encode(key.public_raw).decode(),
        },
    )
    assert cfg.signer("policy").key_id == key.key_id and cfg.signer("rm") is None
    assert cfg.verify_keys("policy").key_ids == cfg.verify_keys("rm").key_ids == [key.key_id]
    with pytest.raises(
        ConfigError, match="RLHF_VERSIONS_RM_SIGNING_KEY_FILE / RLHF_VERSIONS_RM_SIGNING_KEY: .*missing"
    ):
        load_config(VersionTrustConfig, {"RLHF_VERSIONS_RM_SIGNING_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="RLHF_VERSIONS_POLICY_VERIFY_KEYS: .*is 3 bytes"):
        load_config(VersionTrustConfig, {"RLHF_VERSIONS_POLICY_VERIFY_KEYS": "nope"})
    with pytest.raises(ConfigError, match="not both"):
        load_config(
            VersionTrustConfig,
            {
                "RLHF_VERSIONS_POLICY_SIGNING_KEY_FILE": str(tmp_path / "policy.pem"),
                "RLHF_VERSIONS_POLICY_SIGNING_KEY": "x",
            },
        )


def test_off_loopback_publishers_need_signing_keys_and_followers_verify_keys():
    from services.inference.config import InferenceConfig
    from services.trainer.config import TrainerConfig

    open_host = {"RLHF_AUTH_ALLOW_PLAINTEXT": "1"}
    with pytest.raises(ConfigError, match="RLHF_VERSIONS_POLICY_SIGNING_KEY_FILE.*must sign"):
        load_config(TrainerConfig, {"RLHF_TRAINER_HOST": "0.0.0.0", **open_host})
    with pytest.raises(ConfigError, match="RLHF_VERSIONS_POLICY_VERIFY_KEY_FILE.*must verify"):
        load_config(InferenceConfig, {"RLHF_INFERENCE_HOST": "0.0.0.0", **open_host})
    allowed = {"RLHF_VERSIONS_ALLOW_UNSIGNED": "1", **open_host}
    load_config(InferenceConfig, {"RLHF_INFERENCE_HOST": "0.0.0.0", **allowed})
    assert load_config(InferenceConfig, {}).versions.verify_keys("policy") is None  # loopback: development


def test_the_model_store_digest_is_blake3_or_sha256():
    from shared.config import ModelStoreConfig

    assert load_config(ModelStoreConfig, {}).digest == "blake3"
    assert load_config(ModelStoreConfig, {"RLHF_MODEL_STORE_DIGEST": "sha256"}).digest == "sha256"
    with pytest.raises(ConfigError, match="RLHF_MODEL_STORE_DIGEST='md5': blake3 or sha256"):
        load_config(ModelStoreConfig, {"RLHF_MODEL_STORE_DIGEST": "md5"})


# --- cpu_nice: the loop's own work after the users' ------------------------------------------------


def test_the_trainer_runs_at_a_lower_priority_than_serving_by_default():
    from services.reward.config import RewardConfig
    from services.trainer.config import TrainerConfig
    from shared.config import ServiceConfig

    assert load_config(TrainerConfig, {}).cpu_nice == 10
    # The reward service is not on the users' path either, but its retraining is what the trainer
    # learns from: niced, it published 63 reward models in a 20-minute demo against 105 (docs/benchmarks.md).
    assert load_config(RewardConfig, {}).cpu_nice == 0
    assert load_config(InferenceConfig, {}).cpu_nice == 0
    assert ServiceConfig.cpu_nice == 0, "every other service: normal priority"
    assert load_config(TrainerConfig, {"RLHF_TRAINER_CPU_NICE": "0"}).cpu_nice == 0


def test_a_niceness_outside_linux_range_is_refused_naming_the_variable():
    from services.trainer.config import TrainerConfig

    with pytest.raises(ConfigError, match="RLHF_TRAINER_CPU_NICE=20: expected 0 to 19"):
        load_config(TrainerConfig, {"RLHF_TRAINER_CPU_NICE": "20"})


def test_lower_priority_applies_to_the_threads_the_service_starts_afterwards():
    """In a child process (niceness cannot be taken back): the main thread and a thread started
    after lower_priority run at the configured niceness above the one the process started with."""
    import subprocess
    import sys

    code = """
import os, threading
from shared.service_main import lower_priority
from services.trainer.config import TrainerConfig
from shared.config import load_config
before = os.getpriority(os.PRIO_PROCESS, 0)
lower_priority(load_config(TrainerConfig, {}))
seen = []
t = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
t.start(); t.join()
print(before, os.getpriority(os.PRIO_PROCESS, 0), seen[0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, main, thread = map(int, out.stdout.split())
    assert main == thread == min(19, before + 10)
