"""Typed service configuration, loaded from environment variables once at start.

Each service declares one frozen dataclass. Every field has a default and a docstring right under
it (the docstring is the documentation: `rlhf config` prints it). The environment variable of a
field is the class's ``ENV_PREFIX`` plus the field name in upper case; a nested config dataclass
(Kafka, logging, model store) keeps its own prefix, so one ``RLHF_KAFKA_BOOTSTRAP_SERVERS`` serves
every service.

    @dataclass(frozen=True)
    class InferenceConfig(ServiceConfig):
        ENV_PREFIX: ClassVar[str] = "RLHF_INFERENCE_"
        grpc_port: int = 50051
        \"\"\"Port of the gRPC server.\"\"\"

    cfg = load_config(InferenceConfig)          # raises ConfigError naming every bad variable

Validation lives in each class's ``problems()`` so that a bad value is reported with its variable
name before anything starts.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar


class ConfigError(ValueError):
    """One or more environment variables are invalid; the message names each of them."""


@dataclass(frozen=True)
class ConfigBase:
    """Base of every config dataclass: an env prefix and a hook for cross-field checks."""

    ENV_PREFIX: ClassVar[str] = "RLHF_"

    def problems(self) -> list[str]:
        """Return human-readable problems with this config (empty when valid)."""
        return []


@dataclass(frozen=True)
class EnvVar:
    """One documented environment variable of a config class."""

    name: str
    type_name: str
    default: Any
    doc: str


C = TypeVar("C", bound=ConfigBase)


def load_config(cls: type[C], environ: Mapping[str, str] | None = None, **overrides: Any) -> C:
    """Build ``cls`` from ``environ`` (default ``os.environ``); keyword overrides win over the env.

    Raises ConfigError listing every unparsable or invalid variable, and every variable that carries
    this config's prefix but matches no field (a typo would otherwise be silently ignored).
    """
    environ = os.environ if environ is None else environ
    errors: list[str] = []
    cfg = _build(cls, environ, overrides, errors)
    errors += _unknown_vars(cls, environ)
    if not errors:
        errors += _all_problems(cfg)
    if errors:
        raise ConfigError(f"invalid {cls.__name__}:\n  " + "\n  ".join(errors))
    return cfg


def env_vars(cls: type[ConfigBase]) -> list[EnvVar]:
    """Every environment variable ``cls`` reads, nested configs included, in declaration order."""
    out: list[EnvVar] = []
    docs = field_docs(cls)  # type: ignore[arg-type]  # a class is hashable; mypy disagrees (python/mypy#11470)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if _is_config(hint):
            out += env_vars(hint)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert f.default_factory is not dataclasses.MISSING, f"{cls.__name__}.{f.name} has no default"
            default = f.default_factory()
        out.append(EnvVar(_env_name(cls, f.name), _type_name(hint), default, docs.get(f.name, "")))
    return out


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the docstring written under it in the class body (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        class_def = ast.parse(source).body[0]
        assert isinstance(class_def, ast.ClassDef), klass  # the source of a class is its class statement
        body = class_def.body
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def format_env_table(cls: type[ConfigBase]) -> str:
    """A Markdown table of the variables of ``cls``: name, type, default, meaning."""
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for v in env_vars(cls):
        doc = " ".join(v.doc.split()).replace("|", "\\|")
        rows.append(f"| `{v.name}` | {v.type_name} | `{_format_default(v.default)}` | {doc} |")
    return "\n".join(rows)


# --- internals -------------------------------------------------------------------------------


def _env_name(cls: type[ConfigBase], field_name: str) -> str:
    return cls.ENV_PREFIX + field_name.upper()


def _is_config(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, ConfigBase)


def _build(cls: type[C], environ: Mapping[str, str], overrides: Mapping[str, Any], errors: list[str]) -> C:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif _is_config(hint):
            kwargs[f.name] = _build(hint, environ, {}, errors)
        else:
            name = _env_name(cls, f.name)
            if name in environ:
                try:
                    kwargs[f.name] = _parse(environ[name], hint)
                except ValueError as exc:
                    errors.append(f"{name}={environ[name]!r}: {exc}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    return cls(**kwargs)


def _section_prefixes(cls: type[ConfigBase]) -> set[str]:
    """The prefixes of ``cls`` and of every config section nested in it (RLHF_PPO_ in the trainer's)."""
    prefixes = {cls.ENV_PREFIX} if cls.ENV_PREFIX != ConfigBase.ENV_PREFIX else set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            prefixes |= _section_prefixes(hints[f.name])
    return prefixes


def _unknown_vars(cls: type[ConfigBase], environ: Mapping[str, str]) -> list[str]:
    known = {v.name for v in env_vars(cls)}
    prefixes = _section_prefixes(cls)
    return [
        f"{name}: unknown setting (known: {', '.join(sorted(k for k in known if k.startswith(p)))})"
        for p in prefixes
        for name in sorted(environ)
        if name.startswith(p) and name not in known
    ]


def _all_problems(cfg: ConfigBase) -> list[str]:
    out = list(cfg.problems())
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, ConfigBase):
            out += _all_problems(value)
    return out


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(raw: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if raw.strip() == "":
            return None
        return _parse(raw, inner[0])
    if origin is tuple:
        return tuple(_parse(part.strip(), args[0]) for part in raw.split(",") if part.strip())
    if hint is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("expected a boolean (1/0, true/false, yes/no, on/off)")
    if hint is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
    if hint is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise ValueError("expected a number") from None
    if hint is Path:
        return Path(raw)
    if hint is str:
        return raw
    raise TypeError(f"unsupported config field type {hint!r}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} (optional)"
    if origin is tuple:
        return f"comma-separated {_type_name(args[0])}"
    return getattr(hint, "__name__", str(hint))


def _format_default(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


# --- sections every service shares -----------------------------------------------------------


@dataclass(frozen=True)
class LoggingConfig(ConfigBase):
    """How a service writes its logs."""

    ENV_PREFIX: ClassVar[str] = "RLHF_LOG_"

    level: str = "INFO"
    """Log level: DEBUG, INFO, WARNING or ERROR."""
    format: str = "text"
    """`text` (one readable line per record, key=value fields) or `json` (one JSON object per line)."""

    def problems(self) -> list[str]:
        out = []
        if self.level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            out.append(f"RLHF_LOG_LEVEL={self.level!r}: expected DEBUG, INFO, WARNING or ERROR")
        if self.format not in {"text", "json"}:
            out.append(f"RLHF_LOG_FORMAT={self.format!r}: expected text or json")
        return out


@dataclass(frozen=True)
class KafkaConfig(ConfigBase):
    """Where the Kafka cluster is and how clients talk to it (any Kafka-protocol broker works)."""

    ENV_PREFIX: ClassVar[str] = "RLHF_KAFKA_"

    bootstrap_servers: str = ""
    """Comma-separated host:port list. Empty: `rlhf up` and the tests start the embedded broker."""
    client_id: str = "rlhf"
    """Prefix of the Kafka client id; the service name is appended."""
    topic_partitions: int = 1
    """Partitions per topic when this project creates the topics (`rlhf up`; the Helm chart sets its
    own per topic). 1 suits the embedded broker: one in-memory tansu process, and one consumer per
    group in a one-machine loop, so more partitions buy no parallelism, while each partition in a
    produce request costs the broker time: with 3, a rating's acks=all acknowledgement takes
    measurably longer, most of all at p99 (see docs/benchmarks.md). Set more for an external
    cluster whose consumer groups have several members."""
    replication_factor: int = 1
    """Replication factor when this project creates the topics."""
    request_timeout_ms: int = 10000
    """How long a produce or metadata request may take before it fails and is retried."""
    delivery_timeout_s: float = 15.0
    """How long a publish waits for the broker's acks=all acknowledgement before it counts as failed."""
    session_timeout_ms: int = 10000
    """Consumer group session timeout; lower means faster rebalances after a crash."""
    heartbeat_interval_ms: int = 3000
    """Consumer group heartbeat interval (at most a third of the session timeout)."""

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    def problems(self) -> list[str]:
        out = []
        for server in self.servers:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit():
                out.append(f"RLHF_KAFKA_BOOTSTRAP_SERVERS: {server!r} is not host:port")
        if self.topic_partitions < 1:
            out.append("RLHF_KAFKA_TOPIC_PARTITIONS must be at least 1")
        if self.replication_factor < 1:
            out.append("RLHF_KAFKA_REPLICATION_FACTOR must be at least 1")
        if self.delivery_timeout_s * 1000 <= self.request_timeout_ms + 10:
            out.append("RLHF_KAFKA_DELIVERY_TIMEOUT_S must exceed RLHF_KAFKA_REQUEST_TIMEOUT_MS (plus linger)")
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            out.append("RLHF_KAFKA_HEARTBEAT_INTERVAL_MS must be at most a third of RLHF_KAFKA_SESSION_TIMEOUT_MS")
        return out


@dataclass(frozen=True)
class ModelStoreConfig(ConfigBase):
    """Where published model versions live (a shared filesystem path; a ReadWriteMany volume on Kubernetes)."""

    ENV_PREFIX: ClassVar[str] = "RLHF_MODEL_STORE_"

    root: Path = Path("var/models")
    """Directory holding one sub-directory per published version (`policy-0001`, `rm-0001`, ...)."""


@dataclass(frozen=True)
class FeedbackTokenConfig(ConfigBase):
    """The HMAC key behind feedback tokens: the gateway signs them, the feedback service verifies them."""

    ENV_PREFIX: ClassVar[str] = "RLHF_FEEDBACK_TOKEN_"

    secret: str = ""
    """HMAC-SHA256 key (at least 16 characters). `rlhf up` makes a random one per run when unset, so
    tokens then stay valid only until it stops; on Kubernetes it comes from a Secret."""
    ttl_s: int = 7 * 24 * 3600
    """How long after serving a response it may still be rated, in seconds."""

    def problems(self) -> list[str]:
        out = []
        if self.secret and len(self.secret) < 16:
            out.append("RLHF_FEEDBACK_TOKEN_SECRET must be at least 16 characters")
        if self.ttl_s < 1:
            out.append("RLHF_FEEDBACK_TOKEN_TTL_S must be positive")
        return out


@dataclass(frozen=True)
class ServiceConfig(ConfigBase):
    """Settings every service has; each service's config extends this."""

    log: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Logging settings (RLHF_LOG_*)."""
    host: str = "127.0.0.1"
    """Interface the service's servers bind to; 0.0.0.0 in containers."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint; 0 disables it (tests), the service sets its default."""
    grace_period_s: float = 10.0
    """On SIGTERM: how long requests in flight may take to finish before the server stops."""

    def problems(self) -> list[str]:
        out = []
        if not 0 <= self.metrics_port <= 65535:
            out.append(f"{self.ENV_PREFIX}METRICS_PORT={self.metrics_port}: not a port number")
        if self.grace_period_s < 0:
            out.append(f"{self.ENV_PREFIX}GRACE_PERIOD_S must not be negative")
        return out
