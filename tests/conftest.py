"""Fixtures shared by the test suite: a real embedded broker, a real model store with the default
policy, and helpers to run async services (vLLM engine, gRPC, uvicorn) on loopback in-process."""

from __future__ import annotations

import asyncio
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


@pytest.fixture(scope="session")
def policy_store(tmp_path_factory) -> PolicyStore:
    """A model store holding the default model as policy-0001 (current) and, as policy-0002 (not
    current), the same architecture with other random weights: a second policy to swap to."""
    from shared.model_store import ModelStore
    from shared.models.default_model import ensure_default_policy

    root = tmp_path_factory.mktemp("models")
    store = ModelStore(root)
    first = ensure_default_policy(store)
    second = publish_reinitialised(store, first, seed=1)
    return PolicyStore(store, root, first, second)


@dataclasses.dataclass
class PolicyStore:
    store: object
    root: Path
    first: str
    second: str


def publish_reinitialised(store, base_version: str, seed: int, make_current: bool = False) -> str:
    """Publish ``base_version``'s architecture and tokenizer with fresh random weights."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    base = store.path(base_version)
    tmp = Path(store.root) / f".fixture-{seed}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("*.safetensors", "manifest.json"))
    torch.manual_seed(seed)
    LlamaForCausalLM(AutoConfig.from_pretrained(base)).save_pretrained(tmp)
    manifest = store.publish(
        "policy", tmp, parent=base_version, extra={"kind": "test-reinit", "seed": seed}, make_current=make_current
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
        **overrides,
    )

    async def make():
        app = FeedbackApp(cfg)
        await app.start()
        return app

    return loop.run(make(), timeout=120)


def gateway_config(inference_address: str, feedback_address: str = "", **overrides):
    from services.gateway.config import GatewayConfig
    from shared.config import FeedbackTokenConfig, load_config

    return load_config(
        GatewayConfig,
        {},
        inference_address=inference_address,
        feedback_address=feedback_address,
        token=FeedbackTokenConfig(secret=TEST_TOKEN_SECRET),
        **overrides,
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
        max_model_len=512,
        default_max_tokens=32,
        max_tokens_limit=256,
        **overrides,
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
