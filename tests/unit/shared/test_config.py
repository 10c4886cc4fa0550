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
