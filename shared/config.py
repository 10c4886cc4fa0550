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
import hashlib
import inspect
import ipaddress
import os
import re
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
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
    security_protocol: str = "PLAINTEXT"
    """How clients talk to the brokers: PLAINTEXT (the embedded broker of `rlhf up`, loopback only),
    SSL (TLS), SASL_SSL (TLS plus a user name and password: Strimzi's TLS listener with SCRAM) or
    SASL_PLAINTEXT (a password without TLS: only on a private network)."""
    sasl_mechanism: str = "SCRAM-SHA-512"
    """SASL mechanism with SASL_*: SCRAM-SHA-512 (Strimzi's `scram-sha-512`), SCRAM-SHA-256 or PLAIN
    (PLAIN only with SASL_SSL: it sends the password itself)."""
    sasl_username: str = ""
    """SASL user name (Strimzi: the KafkaUser's name)."""
    sasl_password: str = ""
    """SASL password; prefer RLHF_KAFKA_SASL_PASSWORD_FILE (a mounted Secret)."""
    sasl_password_file: Path | None = None
    """File holding the SASL password (Strimzi: the key `password` of the KafkaUser's Secret)."""
    ssl_ca_file: Path | None = None
    """PEM file of the CA that signed the brokers' certificates (Strimzi: `ca.crt` of the Secret
    <cluster>-cluster-ca-cert). Unset: the system's trusted CAs."""
    ssl_cert_file: Path | None = None
    """PEM client certificate, for brokers that authenticate clients by TLS (Strimzi `tls` users: `user.crt`)."""
    ssl_key_file: Path | None = None
    """PEM private key of RLHF_KAFKA_SSL_CERT_FILE (Strimzi `tls` users: `user.key`)."""
    ssl_check_hostname: bool = True
    """Check that the broker's certificate names the host connected to. Off only for a broker whose
    certificate cannot name its address (a test broker)."""

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def sasl_password_value(self) -> str:
        """The SASL password: RLHF_KAFKA_SASL_PASSWORD, or the file's content without the final newline.

        Raises ConfigError naming RLHF_KAFKA_SASL_PASSWORD_FILE when the file cannot be read or is empty.
        """
        if self.sasl_password_file is None:
            return self.sasl_password
        return read_secret_file(self.sasl_password_file, "RLHF_KAFKA_SASL_PASSWORD_FILE")

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
        return out + self._security_problems()

    def _security_problems(self) -> list[str]:
        out = []
        protocols = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if self.security_protocol not in protocols:
            out.append(
                f"RLHF_KAFKA_SECURITY_PROTOCOL={self.security_protocol!r}: expected one of {', '.join(protocols)}"
            )
            return out
        if self.uses_sasl:
            mechanisms = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
            if self.sasl_mechanism not in mechanisms:
                out.append(
                    f"RLHF_KAFKA_SASL_MECHANISM={self.sasl_mechanism!r}: expected one of {', '.join(mechanisms)}"
                )
            if self.sasl_mechanism == "PLAIN" and not self.uses_tls:
                out.append(
                    "RLHF_KAFKA_SASL_MECHANISM=PLAIN sends the password in the clear: use RLHF_KAFKA_SECURITY_PROTOCOL=SASL_SSL"
                )
            if not self.sasl_username:
                out.append(
                    f"RLHF_KAFKA_SASL_USERNAME must be set with RLHF_KAFKA_SECURITY_PROTOCOL={self.security_protocol}"
                )
            if bool(self.sasl_password) == (self.sasl_password_file is not None):
                out.append(
                    f"set exactly one of RLHF_KAFKA_SASL_PASSWORD and RLHF_KAFKA_SASL_PASSWORD_FILE with "
                    f"RLHF_KAFKA_SECURITY_PROTOCOL={self.security_protocol}"
                )
        elif self.sasl_username or self.sasl_password or self.sasl_password_file:
            out.append(
                f"RLHF_KAFKA_SASL_* are set but RLHF_KAFKA_SECURITY_PROTOCOL={self.security_protocol} uses no SASL "
                "(SASL_SSL or SASL_PLAINTEXT do)"
            )
        tls_files = self.ssl_ca_file or self.ssl_cert_file or self.ssl_key_file
        if tls_files and not self.uses_tls:
            out.append(
                f"RLHF_KAFKA_SSL_* files are set but RLHF_KAFKA_SECURITY_PROTOCOL={self.security_protocol} uses no TLS "
                "(SSL or SASL_SSL do)"
            )
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            out.append("RLHF_KAFKA_SSL_CERT_FILE and RLHF_KAFKA_SSL_KEY_FILE go together: set both or neither")
        return out


@dataclass(frozen=True)
class ModelStoreConfig(ConfigBase):
    """Where published model versions live (a shared filesystem path; a ReadWriteMany volume on Kubernetes)."""

    ENV_PREFIX: ClassVar[str] = "RLHF_MODEL_STORE_"

    root: Path = Path("var/models")
    """Directory holding one sub-directory per published version (`policy-0001`, `rm-0001`, ...)."""
    keep_last: int = 5
    """Retention (shared/retention.py, run by each line's publisher: the trainer for policy, the
    reward learner for rm): the newest versions of a line always kept. Also kept whatever else
    matters: the current, candidate and canary pointers, the last announced versions, their
    rollback targets, the trainer's KL reference and the models it depends on, adapter bases, and
    every version pinned (`<line>.pinned`); everything else older than the grace age is removed."""
    keep_ancestors: int = 2
    """Retention: rollback targets kept behind each pointer: its parent, the parent's parent, ..."""
    retention_grace_s: float = 3600.0
    """Retention: a version younger than this (since publication) is never removed, whatever else
    holds: a consumer may still be loading it."""
    retention_interval_s: float = 600.0
    """Retention: seconds between two sweeps of a line; 0 turns retention off (every version is kept)."""
    digest: str = "blake3"
    """The file digest a publisher writes into new versions' manifests: blake3 (several times faster
    than sha256 per core, and parallel: publish and the replicas' verified copies of large weights
    stay I/O-bound) or sha256 (where policy requires a FIPS-approved hash; manifests then stay in
    format 1). Readers check each version with the digest its own manifest names."""

    def problems(self) -> list[str]:
        out = []
        p = self.ENV_PREFIX
        if self.digest not in ("blake3", "sha256"):
            out.append(f"{p}DIGEST={self.digest!r}: blake3 or sha256")
        if self.keep_last < 1:
            out.append(f"{p}KEEP_LAST={self.keep_last}: at least 1 (the newest version is always kept)")
        if self.keep_ancestors < 0:
            out.append(f"{p}KEEP_ANCESTORS={self.keep_ancestors}: must not be negative")
        if self.retention_grace_s < 60:
            out.append(f"{p}RETENTION_GRACE_S={self.retention_grace_s:g}: at least 60 seconds")
        if self.retention_interval_s < 0:
            out.append(f"{p}RETENTION_INTERVAL_S={self.retention_interval_s:g}: must not be negative (0: off)")
        return out


@dataclass(frozen=True)
class VersionTrustConfig(ConfigBase):
    """Signing keys of the version lines (shared/signing.py, shared/version_line.py) and where a
    replica keeps its private copies of the versions it verified.

    Each publisher holds its line's private key (trainer: policy; reward service and offline tools:
    rm); each follower holds the line's public keys (inference: policy; reward: rm). A private key
    is a PEM file or a base64 value; public keys a file (PEM blocks or base64 lines; several for
    rotation) and/or a comma-separated base64 value. Without a line's public keys its followers
    accept unsigned versions: development only, refused off loopback unless RLHF_VERSIONS_ALLOW_UNSIGNED.
    """

    ENV_PREFIX: ClassVar[str] = "RLHF_VERSIONS_"

    policy_signing_key_file: Path | None = None
    """PEM file of the Ed25519 private key that signs policy versions (the trainer, `rlhf bootstrap`)."""
    policy_signing_key: str = ""
    """The same key as a base64 value (of the PEM or of the raw 32-byte seed), instead of the file."""
    rm_signing_key_file: Path | None = None
    """PEM file of the Ed25519 private key that signs reward model versions (the reward service's
    retraining loop, `rlhf train-rm`, `rlhf bootstrap`)."""
    rm_signing_key: str = ""
    """The same key as a base64 value, instead of the file."""
    policy_verify_key_file: Path | None = None
    """File of the public keys trusted for policy versions (inference): PEM blocks or base64 lines."""
    policy_verify_keys: str = ""
    """Comma-separated base64 raw public keys trusted for policy versions (added to the file's)."""
    rm_verify_key_file: Path | None = None
    """File of the public keys trusted for reward model versions (reward scorers)."""
    rm_verify_keys: str = ""
    """Comma-separated base64 raw public keys trusted for reward model versions (added to the file's)."""
    allow_unsigned: bool = False
    """Let a service off loopback run without the keys of its line (followers then accept unsigned
    versions and announcements). Never in production; on loopback it is implied when no key is set."""
    copies_dir: Path | None = None
    """Where a replica copies each version it verifies and loads it from (a directory only it writes;
    an emptyDir on Kubernetes, room for two versions). Unset: <system temp dir>/rlhf-version-copies."""

    def signer(self, line: str) -> Any:
        """The line's SigningKey, or None when not configured (ConfigError when unreadable)."""
        from shared.signing import KeyFormatError, SigningKey

        file, value = getattr(self, f"{line}_signing_key_file"), getattr(self, f"{line}_signing_key")
        try:
            return SigningKey.load(file=file, value=value)
        except KeyFormatError as exc:
            raise ConfigError(f"{self._names(line, 'signing_key')}: {exc}") from None

    def verify_keys(self, line: str) -> Any:
        """The line's VerifyKeys, or None when not configured (ConfigError when unreadable)."""
        from shared.signing import KeyFormatError, VerifyKeys

        file, values = getattr(self, f"{line}_verify_key_file"), getattr(self, f"{line}_verify_keys")
        try:
            return VerifyKeys.load(file=file, values=values)
        except KeyFormatError as exc:
            raise ConfigError(f"{self._names(line, 'verify_key')}: {exc}") from None

    def _names(self, line: str, what: str) -> str:
        base = f"{self.ENV_PREFIX}{line.upper()}_{what.upper()}"
        return f"{base}_FILE / {base}{'S' if what == 'verify_key' else ''}"

    def problems(self) -> list[str]:
        out = []
        for line in ("policy", "rm"):
            if getattr(self, f"{line}_signing_key_file") is not None and getattr(self, f"{line}_signing_key"):
                out.append(f"{self._names(line, 'signing_key')}: set the file or the value, not both")
                continue
            for load in (self.signer, self.verify_keys):
                try:
                    load(line)
                except ConfigError as exc:
                    out.append(str(exc))
        return out

    def missing(self, host: str, *, signs: tuple[str, ...] = (), follows: tuple[str, ...] = ()) -> list[str]:
        """Problems of a service on ``host`` that publishes the lines ``signs`` and follows ``follows``:
        off loopback each needs its key unless RLHF_VERSIONS_ALLOW_UNSIGNED is set."""
        if self.allow_unsigned or is_loopback(host):
            return []
        out = []
        for line in signs:
            if getattr(self, f"{line}_signing_key_file") is None and not getattr(self, f"{line}_signing_key"):
                out.append(
                    f"{self._names(line, 'signing_key')}: a service off loopback must sign the {line} versions "
                    f"it publishes (or set {self.ENV_PREFIX}ALLOW_UNSIGNED=1, never in production)"
                )
        for line in follows:
            if getattr(self, f"{line}_verify_key_file") is None and not getattr(self, f"{line}_verify_keys").strip():
                out.append(
                    f"{self._names(line, 'verify_key')}: a service off loopback must verify the {line} versions "
                    f"it loads (or set {self.ENV_PREFIX}ALLOW_UNSIGNED=1, never in production)"
                )
        return out


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


def read_secret_file(path: Path, variable: str) -> str:
    """The content of a mounted secret file, without surrounding whitespace (a final newline).

    Raises ConfigError naming ``variable`` when the file cannot be read or holds nothing.
    """
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{variable}={str(path)!r}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    if not value:
        raise ConfigError(f"{variable}={str(path)!r}: the file is empty")
    return value


# --- service-to-service credentials ------------------------------------------------------------

MIN_TOKEN_CHARS = 24
"""Shortest bearer token accepted: `rlhf up` and the Helm chart make 43-character random ones."""
_TOKEN = re.compile(r"[\x21-\x7e]+")
_CALLER = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
_ACCEPT_ENTRY = re.compile(r"([^:\s]+):([0-9a-f]{64})")


def token_digest(token: str) -> bytes:
    """SHA-256 of a bearer token's UTF-8 bytes: what a service keeps and compares, never the token."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def credential_entry(name: str, token: str) -> str:
    """The accepted-credential entry for caller ``name`` with ``token``: ``name:<sha256 hex>``."""
    return f"{name}:{token_digest(token).hex()}"


def token_problem(token: str, variable: str) -> str | None:
    """Why ``token`` cannot be a bearer token (None when it can): at least MIN_TOKEN_CHARS printable
    ASCII characters without spaces (it travels in a gRPC metadata value)."""
    if not _TOKEN.fullmatch(token):
        return f"{variable}: a token is printable ASCII without spaces"
    if len(token) < MIN_TOKEN_CHARS:
        return f"{variable}: a token has at least {MIN_TOKEN_CHARS} characters (got {len(token)})"
    return None


def parse_accepted(entries: Iterable[str], variable: str) -> tuple[dict[bytes, str], list[str]]:
    """Accepted credentials from ``name:<sha256 hex of the token>`` entries.

    Returns (digest -> caller name, problems). A name is lower-case letters, digits and ``_.-``,
    starting with a letter; one name may have several entries (a credential being rotated); one
    digest may not appear twice (two callers with one token could not be told apart). Blank entries
    and ``#`` comments are skipped (the file form).
    """
    accepted: dict[bytes, str] = {}
    problems: list[str] = []
    for raw in entries:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        m = _ACCEPT_ENTRY.fullmatch(entry)
        if not m:
            shown = entry.split(":", 1)[0] + (":..." if ":" in entry else "")
            problems.append(f"{variable}: {shown!r} is not name:<64 lower-case hex digits of the token's sha256>")
            continue
        name, digest = m.group(1), bytes.fromhex(m.group(2))
        if not _CALLER.fullmatch(name):
            problems.append(
                f"{variable}: caller name {name!r} must be lower-case letters, digits, _ . - (a letter first)"
            )
        elif digest in accepted:
            problems.append(f"{variable}: {name!r} has the same credential as {accepted[digest]!r}")
        else:
            accepted[digest] = name
    return accepted, problems


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServiceAuthConfig(ConfigBase):
    """Who this service is to the services it calls, whom it accepts, and its gRPC TLS.

    Every gRPC call carries a bearer token (metadata `authorization: Bearer <token>`); a server
    accepts the tokens whose SHA-256 is listed, each under a caller name, and each RPC allows named
    callers only (see docs/security.md). Health checks stay open for probes.
    """

    ENV_PREFIX: ClassVar[str] = "RLHF_AUTH_"

    token: str = ""
    """This service's own bearer token, presented to the services it calls (the gateway's and the
    trainer's; `rlhf up` generates them, on Kubernetes they come from a Secret)."""
    token_file: Path | None = None
    """File holding this service's own token instead of RLHF_AUTH_TOKEN (a mounted Secret)."""
    accept: tuple[str, ...] = ()
    """Credentials this service's gRPC server accepts: comma-separated `name:<sha256 hex of the token>`
    (caller names: gateway, trainer, operator, monitoring). Empty, with RLHF_AUTH_ACCEPT_FILE unset:
    every call is refused (health checks excepted)."""
    accept_file: Path | None = None
    """File of accepted credentials, one `name:<sha256 hex>` per line (`#` comments), added to RLHF_AUTH_ACCEPT."""
    tls_cert_file: Path | None = None
    """PEM certificate (chain) of this service's gRPC server (cert-manager's `tls.crt`); with
    RLHF_AUTH_TLS_KEY_FILE the server speaks TLS only."""
    tls_key_file: Path | None = None
    """PEM private key of RLHF_AUTH_TLS_CERT_FILE (cert-manager's `tls.key`)."""
    tls_ca_file: Path | None = None
    """PEM CA certificate(s) that sign the services' certificates (cert-manager's `ca.crt`): set, this
    service's clients speak TLS and verify the server against it; with RLHF_AUTH_TLS_CLIENT_AUTH the
    server also checks client certificates against it."""
    tls_client_auth: bool = False
    """Mutual TLS: the server requires a client certificate signed by RLHF_AUTH_TLS_CA_FILE, and
    this service's clients present RLHF_AUTH_TLS_CERT_FILE. The bearer token still names the caller."""
    tls_server_name: str = ""
    """Name the server certificates are checked against instead of each address's host (a
    certificate issued for one name, reached at another address)."""
    allow_plaintext: bool = False
    """Allow gRPC without TLS off loopback (tokens readable on the wire): only where the network
    itself is encrypted (a service mesh's mutual TLS). Loopback never needs it."""

    @property
    def tls_server(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None

    def own_token(self) -> str:
        """This service's token ('' when it has none); reads RLHF_AUTH_TOKEN_FILE when set."""
        if self.token_file is not None:
            token = read_secret_file(self.token_file, "RLHF_AUTH_TOKEN_FILE")
            problem = token_problem(token, "RLHF_AUTH_TOKEN_FILE")
            if problem:
                raise ConfigError(problem)
            return token
        return self.token

    def accepted_callers(self) -> dict[bytes, str]:
        """Digest -> caller name of every accepted credential (RLHF_AUTH_ACCEPT and the file).

        Raises ConfigError naming the variable when an entry is malformed or the file unreadable.
        """
        accepted, problems = parse_accepted(self.accept, "RLHF_AUTH_ACCEPT")
        if self.accept_file is not None:
            lines = read_secret_file(self.accept_file, "RLHF_AUTH_ACCEPT_FILE").splitlines()
            from_file, more = parse_accepted(lines, "RLHF_AUTH_ACCEPT_FILE")
            problems += more
            for digest, name in from_file.items():
                if digest in accepted and accepted[digest] != name:
                    problems.append(f"RLHF_AUTH_ACCEPT_FILE: {name!r} has the same credential as {accepted[digest]!r}")
                accepted[digest] = name
        if problems:
            raise ConfigError("invalid accepted credentials:\n  " + "\n  ".join(problems))
        return accepted

    def problems(self) -> list[str]:
        out = []
        if self.token and self.token_file is not None:
            out.append("set one of RLHF_AUTH_TOKEN and RLHF_AUTH_TOKEN_FILE, not both")
        elif self.token:
            problem = token_problem(self.token, "RLHF_AUTH_TOKEN")
            if problem:
                out.append(problem)
        out += parse_accepted(self.accept, "RLHF_AUTH_ACCEPT")[1]
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            out.append("RLHF_AUTH_TLS_CERT_FILE and RLHF_AUTH_TLS_KEY_FILE go together: set both or neither")
        if self.tls_client_auth and (self.tls_ca_file is None or not self.tls_server):
            out.append(
                "RLHF_AUTH_TLS_CLIENT_AUTH needs RLHF_AUTH_TLS_CA_FILE (to check clients) and "
                "RLHF_AUTH_TLS_CERT_FILE/KEY_FILE (to present as a client)"
            )
        return out


@dataclass(frozen=True)
class OperatorConfig(ConfigBase):
    """The operator's credential and TLS settings for the control commands (`rlhf trainer`)."""

    ENV_PREFIX: ClassVar[str] = "RLHF_OPERATOR_"

    token: str = ""
    """The operator's bearer token (the trainer's Pause/Resume/PublishNow/Rollback need it)."""
    token_file: Path = Path("var/operator-token")
    """File holding the operator token, read when RLHF_OPERATOR_TOKEN is unset and the file exists
    (`rlhf up` writes it, mode 0600; on Kubernetes: the operator credential Secret's `token`)."""
    tls_ca_file: Path | None = None
    """PEM CA certificate the trainer's server certificate is checked against; set when the
    services speak TLS (the release's `ca.crt`)."""
    tls_cert_file: Path | None = None
    """PEM client certificate, when the services require mutual TLS."""
    tls_key_file: Path | None = None
    """PEM private key of RLHF_OPERATOR_TLS_CERT_FILE."""
    tls_server_name: str = ""
    """Name the server certificate is checked against instead of the address's host (e.g. when
    reaching the trainer through `kubectl port-forward` at 127.0.0.1)."""
    allow_plaintext: bool = False
    """Send the token without TLS to a host that is not loopback (only over an encrypted network)."""

    def own_token(self) -> str:
        """The operator token: RLHF_OPERATOR_TOKEN, else the file when it exists, else ''."""
        if self.token:
            return self.token
        if self.token_file.exists():
            return read_secret_file(self.token_file, "RLHF_OPERATOR_TOKEN_FILE")
        return ""

    def problems(self) -> list[str]:
        out = []
        if self.token:
            problem = token_problem(self.token, "RLHF_OPERATOR_TOKEN")
            if problem:
                out.append(problem)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            out.append("RLHF_OPERATOR_TLS_CERT_FILE and RLHF_OPERATOR_TLS_KEY_FILE go together: set both or neither")
        return out


@dataclass(frozen=True)
class ServiceConfig(ConfigBase):
    """Settings every service has; each service's config extends this."""

    log: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Logging settings (RLHF_LOG_*)."""
    auth: ServiceAuthConfig = dataclasses.field(default_factory=ServiceAuthConfig)
    """Service-to-service credentials and gRPC TLS (RLHF_AUTH_*)."""
    host: str = "127.0.0.1"
    """Interface the service's servers bind to; 0.0.0.0 in containers."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint; 0 disables it (tests), the service sets its default."""
    grace_period_s: float = 10.0
    """On SIGTERM: how long requests in flight may take to finish before the server stops."""
    health_port: int = 0
    """Port of a plaintext gRPC server that answers grpc.health.v1 only, beside a TLS gRPC server
    (Kubernetes' grpc probes cannot speak TLS); 0: none, health is on the main port only."""
    grpc_max_concurrent_rpcs: int = 1024
    """Services with a gRPC server: most calls it handles at once (long-lived health watches and
    streams count); a call beyond it is refused at once with RESOURCE_EXHAUSTED instead of queueing
    without bound."""
    cpu_nice: int = 0
    """Added to the process's niceness at start, before any of its threads exist (Linux nice, 0 to
    19): a service doing the loop's own work (the trainer: 10) gets the cores only after the serving
    processes on a shared machine. 0: the priority it was started with."""

    def problems(self) -> list[str]:
        out = []
        if not 0 <= self.cpu_nice <= 19:
            out.append(f"{self.ENV_PREFIX}CPU_NICE={self.cpu_nice}: expected 0 to 19")
        if not 1 <= self.grpc_max_concurrent_rpcs <= 1_000_000:
            out.append(
                f"{self.ENV_PREFIX}GRPC_MAX_CONCURRENT_RPCS={self.grpc_max_concurrent_rpcs}: expected 1 to 1000000"
            )
        if not 0 <= self.metrics_port <= 65535:
            out.append(f"{self.ENV_PREFIX}METRICS_PORT={self.metrics_port}: not a port number")
        if not 0 <= self.health_port <= 65535:
            out.append(f"{self.ENV_PREFIX}HEALTH_PORT={self.health_port}: not a port number")
        if self.grace_period_s < 0:
            out.append(f"{self.ENV_PREFIX}GRACE_PERIOD_S must not be negative")
        serves_grpc = hasattr(self, "grpc_port")
        if serves_grpc and not is_loopback(self.host) and not self.auth.tls_server and not self.auth.allow_plaintext:
            out.append(
                f"{self.ENV_PREFIX}HOST={self.host}: a gRPC server off loopback needs TLS (RLHF_AUTH_TLS_CERT_FILE "
                "and RLHF_AUTH_TLS_KEY_FILE), or RLHF_AUTH_ALLOW_PLAINTEXT=1 where the network is encrypted"
            )
        return out
