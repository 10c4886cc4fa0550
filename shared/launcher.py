"""`rlhf up`: run the whole loop on one machine, each service in its own process.

Starts the embedded broker when no Kafka is configured, creates the topics, publishes the default
policy when the model store has none, then starts the services in dependency order, waiting for
each to report healthy before the next. Ctrl-C or SIGTERM stops them in reverse order.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.feedback.config import FeedbackConfig
from services.gateway.config import GatewayConfig
from services.inference.config import InferenceConfig
from shared.config import ConfigBase, KafkaConfig, LoggingConfig, ModelStoreConfig, load_config
from shared.kafka.admin import ensure_topics
from shared.kafka.embedded import EmbeddedBroker
from shared.logging import get_logger, log_event

log = get_logger(__name__)


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


@dataclass
class ServiceProcess:
    name: str
    module: str
    ready: Callable[[], bool]
    endpoints: dict[str, str]
    proc: subprocess.Popen | None = None


def grpc_serving(address: str) -> Callable[[], bool]:
    def check() -> bool:
        with grpc.insecure_channel(address) as channel:
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

    def start(self) -> None:
        kafka = self.cfg.kafka
        if not kafka.servers:
            self.broker = EmbeddedBroker(port=self.cfg.broker_port or None).start()
            self.environ["RLHF_KAFKA_BOOTSTRAP_SERVERS"] = self.broker.bootstrap_servers
            kafka = dataclasses.replace(kafka, bootstrap_servers=self.broker.bootstrap_servers)
        ensure_topics(kafka)
        self._ensure_policy()
        # One machine, one run: a fresh token key unless one is configured (tokens then expire with the run).
        self.environ.setdefault("RLHF_FEEDBACK_TOKEN_SECRET", secrets.token_urlsafe(32))
        inference = load_config(InferenceConfig, self.environ)
        feedback = load_config(FeedbackConfig, self.environ)
        self.environ.setdefault("RLHF_GATEWAY_INFERENCE_ADDRESS", f"{inference.host}:{inference.grpc_port}")
        self.environ.setdefault("RLHF_GATEWAY_FEEDBACK_ADDRESS", f"{feedback.host}:{feedback.grpc_port}")
        gateway = load_config(GatewayConfig, self.environ)
        gateway_url = f"http://{gateway.host}:{gateway.port}"
        planned = [
            ServiceProcess("inference", "services.inference", grpc_serving(f"{inference.host}:{inference.grpc_port}"),
                           {"gRPC": f"{inference.host}:{inference.grpc_port}"}),
            ServiceProcess("feedback", "services.feedback", grpc_serving(f"{feedback.host}:{feedback.grpc_port}"),
                           {"gRPC": f"{feedback.host}:{feedback.grpc_port}"}),
            ServiceProcess("gateway", "services.gateway", http_ok(f"{gateway_url}/healthz"),
                           {"chat page": f"{gateway_url}/", "OpenAI API": f"{gateway_url}/v1",
                            "feedback": f"{gateway_url}/v1/feedback"}),
        ]
        for svc in planned:
            self._spawn(svc)

    def _ensure_policy(self) -> None:
        from shared.default_model import ensure_default_policy
        from shared.model_store import ModelStore

        ensure_default_policy(ModelStore(self.cfg.model_store.root))

    def _spawn(self, svc: ServiceProcess) -> None:
        started = time.monotonic()
        svc.proc = subprocess.Popen([sys.executable, "-m", svc.module], env=self.environ, stdin=subprocess.DEVNULL)
        self.services.append(svc)
        deadline = started + self.cfg.startup_timeout_s
        while not svc.ready():
            if svc.proc.poll() is not None:
                raise RuntimeError(f"{svc.name} exited with code {svc.proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{svc.name} not healthy after {self.cfg.startup_timeout_s:.0f} s")
            time.sleep(0.25)
        log_event(log, "service up", service=svc.name, start_s=round(time.monotonic() - started, 1), **svc.endpoints)

    def wait(self, stop: threading.Event) -> str | None:
        """Block until ``stop`` is set or a service dies; returns the dead service's name."""
        while not stop.wait(0.5):
            for svc in self.services:
                if svc.proc and svc.proc.poll() is not None:
                    return svc.name
        return None

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
                lines.append(f"  {svc.name:<10} {label:<10} {where}")
        if self.broker:
            lines.append(f"  {'kafka':<10} {'embedded':<10} {self.broker.bootstrap_servers} "
                         "(tansu, memory only: records vanish when it stops)")
        else:
            lines.append(f"  {'kafka':<10} {'external':<10} {self.cfg.kafka.bootstrap_servers}")
        lines.append(f"  {'models':<10} {'store':<10} {Path(self.cfg.model_store.root).resolve()}")
        lines.append("Press Ctrl-C to stop.")
        return "\n".join(lines)


def run_up() -> int:
    cfg = load_config(UpConfig)
    stack = Stack(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stack.start()
        print(stack.summary(), flush=True)
        dead = stack.wait(stop)
        if dead:
            log_event(log, "service died; stopping the stack", level=40, service=dead)
            return 1
        return 0
    finally:
        stack.stop()
