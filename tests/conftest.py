"""Fixtures shared by the test suite: a real embedded broker, a real model store with the default
policy, and helpers to run async services (vLLM engine, gRPC, uvicorn) on loopback in-process."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.config import KafkaConfig
from shared.kafka.admin import ensure_topics
from shared.kafka.embedded import EmbeddedBroker, free_port

# vLLM on this 2-core machine: 1 GiB of KV cache is plenty for the tiny default model.
TEST_KV_CACHE_GIB = 1


@dataclasses.dataclass
class Broker:
    broker: EmbeddedBroker
    kafka: KafkaConfig


def start_broker(port: int | None = None) -> Broker:
    broker = EmbeddedBroker(port=port).start()
    # Low group timeouts: a fresh consumer group gets its partitions in seconds, not tens of seconds.
    # 3 partitions, not `rlhf up`'s 1: the tests cover keyed ordering and readers of several
    # partitions, as on an external cluster.
    kafka = KafkaConfig(
        bootstrap_servers=broker.bootstrap_servers,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        delivery_timeout_s=5.0,
        request_timeout_ms=3000,
        topic_partitions=3,
    )
    ensure_topics(kafka)
    return Broker(broker, kafka)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """One embedded tansu broker for the whole session, with the loop's topics created."""
    b = start_broker()
    yield b
    b.broker.stop()


# --- version signing: the test suite's keys (shared/signing.py) ----------------------------------

TEST_POLICY_SEED = bytes(range(32))
"""Raw seed of the test suite's policy signing key (a fixed key: tests and fixtures agree on it)."""
TEST_RM_SEED = bytes(range(32, 64))


def test_signing_key(line: str = "policy"):
    """The test suite's signing key of a version line (deterministic)."""
    from shared.signing import SigningKey

    return SigningKey.from_bytes(base64.b64encode(TEST_POLICY_SEED if line == "policy" else TEST_RM_SEED), line)


def test_versions(**overrides):
    """The RLHF_VERSIONS_* section of a service that verifies (and, for publishers, signs) versions
    with the test suite's keys."""
    from shared.config import VersionTrustConfig

    values = {
        "policy_signing_key": base64.b64encode(TEST_POLICY_SEED).decode(),
        "rm_signing_key": base64.b64encode(TEST_RM_SEED).decode(),
        "policy_verify_keys": base64.b64encode(test_signing_key("policy").public_raw).decode(),
        "rm_verify_keys": base64.b64encode(test_signing_key("rm").public_raw).decode(),
        **overrides,
    }
    return VersionTrustConfig(**values)


test_signing_key.__test__ = False  # helpers, not tests
test_versions.__test__ = False


@pytest.fixture(scope="session")
def policy_store(tmp_path_factory) -> PolicyStore:
    """A model store holding the default model as policy-0001 (current) and, as policy-0002 (not
    current), the same architecture with other random weights: a second policy to swap to. Both are
    signed with the test policy key (``test_signing_key()``), as the trainer and `rlhf bootstrap` sign."""
    from shared.model_store import ModelStore
    from shared.models.default_model import ensure_default_policy

    root = tmp_path_factory.mktemp("models")
    store = ModelStore(root)
    first = ensure_default_policy(store, signer=test_signing_key())
    second = publish_reinitialised(store, first, seed=1)
    return PolicyStore(store, root, first, second)


@dataclasses.dataclass
class PolicyStore:
    store: object
    root: Path
    first: str
    second: str


def publish_reinitialised(store, base_version: str, seed: int, make_current: bool = False) -> str:
    """Publish ``base_version``'s architecture and tokenizer with fresh random weights (signed with the
    test policy key)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from shared.version_line import POLICY, VersionLine

    base = store.path(base_version)
    tmp = Path(store.root) / f".fixture-{seed}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("*.safetensors", "manifest.*"))
    torch.manual_seed(seed)
    LlamaForCausalLM(AutoConfig.from_pretrained(base)).save_pretrained(tmp)
    manifest = VersionLine(store, POLICY, signer=test_signing_key()).publish(
        tmp, parent=base_version, extra={"kind": "test-reinit", "seed": seed}, make_current=make_current
    )
    shutil.rmtree(tmp)
    return manifest.version


def transformers_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt_ids`` by transformers: the reference vLLM must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()


class LoopThread:
    """An asyncio loop in a background thread, for async servers driven from sync tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


TEST_TOKEN_SECRET = "test-feedback-token-secret-0123456789"

# --- service-to-service credentials: every service the tests start has auth on ---------------------

TEST_CALLER_TOKENS = {
    caller: f"test-{caller}-grpc-token-0123456789abcdef" for caller in ("gateway", "trainer", "operator", "monitoring")
}
"""The bearer token of each caller in the test suite (as `rlhf up` makes one per caller)."""


def test_auth(caller: str | None = None, **overrides):
    """The RLHF_AUTH_* section of a service the tests start: it accepts every test caller's token,
    and presents ``caller``'s own when it calls others (the gateway, the trainer)."""
    from shared.config import ServiceAuthConfig, credential_entry

    values = {
        "token": TEST_CALLER_TOKENS[caller] if caller else "",
        "accept": tuple(credential_entry(name, token) for name, token in TEST_CALLER_TOKENS.items()),
        **overrides,
    }
    return ServiceAuthConfig(**values)


test_auth.__test__ = False  # a helper, not a test


def caller_credentials(caller: str):
    """ClientCredentials of a test caller (gateway, trainer, operator, monitoring)."""
    from shared.grpc_channels import ClientCredentials

    return ClientCredentials(token=TEST_CALLER_TOKENS[caller])


def grpc_channel(address: str, caller: str, **options):
    """A synchronous gRPC channel to a test service, calling as ``caller``."""
    from shared.grpc_channels import sync_channel

    return sync_channel(address, caller_credentials(caller), options=list(options.items()))


def start_feedback(loop: LoopThread, kafka: KafkaConfig, **overrides):
    """A FeedbackApp (real gRPC server on loopback, real Kafka) running on ``loop``."""
    from services.feedback.app import FeedbackApp
    from services.feedback.config import FeedbackConfig
    from shared.config import FeedbackTokenConfig, load_config

    cfg = load_config(
        FeedbackConfig,
        {},
        grpc_port=0,
        metrics_port=0,
        kafka=kafka,
        token=FeedbackTokenConfig(secret=TEST_TOKEN_SECRET),
        **{"auth": test_auth(), **overrides},
    )

    async def make():
        app = FeedbackApp(cfg)
        await app.start()
        return app

    return loop.run(make(), timeout=120)


TEST_API_KEYS = {name: f"test-{name}-api-key-0123456789abcdef" for name in ("alice", "bob", "carol")}
"""The gateway API key of each test principal (RLHF_GATEWAY_API_KEYS `name:key` pairs)."""


def api_keys_setting(names: tuple[str, ...] = tuple(TEST_API_KEYS)) -> str:
    """RLHF_GATEWAY_API_KEYS for these test principals."""
    return ",".join(f"{name}:{TEST_API_KEYS[name]}" for name in names)


def gateway_config(inference_address: str, feedback_address: str = "", **overrides):
    """A gateway config on loopback with the test principals' keys (TEST_API_KEYS) and no rate limits
    (tests of the limits set their own); ``overrides`` win."""
    from services.gateway.config import GatewayConfig
    from shared.config import FeedbackTokenConfig, load_config

    overrides = {"api_keys": api_keys_setting(), "chat_rate_per_min": 0, "feedback_rate_per_min": 0, **overrides}

    return load_config(
        GatewayConfig,
        {},
        inference_address=inference_address,
        feedback_address=feedback_address,
        token=FeedbackTokenConfig(secret=TEST_TOKEN_SECRET),
        **{"auth": test_auth("gateway"), **overrides},
    )


def start_inference(loop: LoopThread, kafka: KafkaConfig | None, store_root: Path, **overrides):
    """An InferenceApp (real vLLM engine, real gRPC server on loopback) running on ``loop``."""
    from services.inference.app import InferenceApp
    from services.inference.config import InferenceConfig
    from shared.config import ModelStoreConfig, load_config

    cfg = load_config(
        InferenceConfig,
        {},
        grpc_port=0,
        metrics_port=0,
        kv_cache_gib=TEST_KV_CACHE_GIB,
        kafka=kafka or KafkaConfig(),
        model_store=ModelStoreConfig(root=store_root),
        default_max_tokens=32,
        **{"auth": test_auth(), "max_model_len": 512, "max_tokens_limit": 256, **overrides},
    )

    async def make():
        app = InferenceApp(cfg)
        await app.start()
        return app

    return loop.run(make(), timeout=600)


class UvicornThread:
    """A uvicorn server for the gateway's ASGI app on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        from services.gateway.uvicorn_single_write import CoalescingHttpToolsProtocol

        # The gateway's HTTP protocol, as `python -m services.gateway` runs it.
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_config=None,
                access_log=False,
                lifespan="on",
                http=CoalescingHttpToolsProtocol,
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_until(predicate: Callable[[], bool], timeout: float, message: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {message}")
        time.sleep(interval)


def consume_events(
    kafka: KafkaConfig, topic: str, want: Callable[[object], bool], count: int, timeout: float = 30.0
) -> list:
    """Read ``topic`` from the beginning until ``count`` envelopes match ``want``."""
    from kafka import KafkaConsumer, TopicPartition

    from shared.kafka.envelope import decode

    consumer = KafkaConsumer(
        bootstrap_servers=kafka.servers, enable_auto_commit=False, group_id=None, auto_offset_reset="earliest"
    )
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        found = []
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                for r in records:
                    env = decode(r.value)
                    if want(env):
                        found.append(env)
        return found
    finally:
        consumer.close()


# --- a throwaway PKI for TLS tests -----------------------------------------------------------------


@dataclasses.dataclass
class TestPki:
    """PEM files of a throwaway CA and what it signed, named as cert-manager names them."""

    ca: Path
    """ca.crt: the CA certificate."""
    cert: Path
    """tls.crt: a server (and client) certificate for localhost and 127.0.0.1."""
    key: Path
    """tls.key: its private key."""
    other_ca: Path
    """A second CA that signed nothing here: trusting it must fail."""


TestPki.__test__ = False  # a helper, not a test class


def issue_test_pki(directory: Path, names: tuple[str, ...] = ("localhost",)) -> TestPki:
    """A CA, and one certificate it signs for ``names`` and 127.0.0.1 (server and client use),
    written as ca.crt, tls.crt, tls.key in ``directory``; plus an unrelated CA (other-ca.crt)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        k = key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(k, hashes.SHA256())
        )
        return k, cert

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = ca("rlhf test CA")
    _, other = ca("another CA")
    leaf_key = key()
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = TestPki(directory / "ca.crt", directory / "tls.crt", directory / "tls.key", directory / "other-ca.crt")
    pki.ca.write_bytes(pem(ca_cert))
    pki.cert.write_bytes(pem(leaf))
    pki.key.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pki.other_ca.write_bytes(pem(other))
    return pki
