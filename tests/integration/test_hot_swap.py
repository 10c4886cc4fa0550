"""Hot-swapping policy weights in a running vLLM engine, refusing bad updates, and surviving a
broker outage: real broker, real engine, real gRPC on loopback."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from prometheus_client import REGISTRY

from shared.events import CompletionEvent, PolicyUpdateEvent
from shared.kafka.admin import ensure_topics
from shared.kafka.embedded import EmbeddedBroker
from shared.kafka.publishers import KafkaPublisher
from shared.kafka.topics import COMPLETIONS, POLICY_UPDATES
from shared.pb import common_pb2, inference_pb2, inference_pb2_grpc
from tests.conftest import (
    LoopThread,
    consume_events,
    publish_reinitialised,
    start_broker,
    start_inference,
    transformers_greedy,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = [common_pb2.ChatMessage(role="user", content="What is 9 plus 4?")]


@pytest.fixture(scope="module")
def env(policy_store):
    own = start_broker()  # this module stops and restarts its broker
    loop = LoopThread()
    app = start_inference(loop, own.kafka, policy_store.root)
    channel = grpc.insecure_channel(app.address)
    yield {
        "app": app,
        "loop": loop,
        "broker": own,
        "stub": inference_pb2_grpc.InferenceServiceStub(channel),
        "store": policy_store.store,
        "first": policy_store.first,
        "second": policy_store.second,
    }
    channel.close()
    loop.run(app.stop())
    loop.close()
    own.broker.stop()


def greedy(stub, max_tokens=24):
    return stub.Generate(
        inference_pb2.GenerateRequest(
            messages=PROMPT, sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=max_tokens)
        )
    )


def announce(env, version: str, sha: str | None = None) -> None:
    publisher = KafkaPublisher(env["broker"].kafka, "test")
    store = env["store"]
    publisher.publish_and_wait(
        POLICY_UPDATES,
        PolicyUpdateEvent(version=version, manifest_sha256=sha or store.manifest_sha256(version)),
        key="policy",
    )
    publisher.close()


def refused(reason: str) -> float:
    return REGISTRY.get_sample_value("rlhf_inference_swap_refused_total", {"reason": reason}) or 0.0


def test_announced_version_is_swapped_in_and_reproduces_transformers_exactly(env):
    stub, store = env["stub"], env["store"]
    before = greedy(stub)
    assert before.policy_version == env["first"]
    old_reference = transformers_greedy(store.path(env["first"]), list(before.prompt_token_ids), 24)
    assert list(before.completions[0].token_ids) == old_reference[: len(before.completions[0].token_ids)]

    announce(env, env["second"])
    wait_until(
        lambda: stub.GetPolicy(inference_pb2.GetPolicyRequest()).policy_version == env["second"],
        30,
        "the update was not applied",
    )

    after = greedy(stub)
    assert after.policy_version == env["second"]
    new_reference = transformers_greedy(store.path(env["second"]), list(after.prompt_token_ids), 24)
    assert list(after.completions[0].token_ids) == new_reference[: len(after.completions[0].token_ids)]
    assert new_reference != old_reference, "the two policies should differ, or this test proves nothing"
    info = stub.GetPolicy(inference_pb2.GetPolicyRequest())
    assert info.swaps == 1 and info.refused_updates == 0


def test_request_in_flight_finishes_on_the_weights_it_started_with(env):
    """A stream admitted before a swap is generated entirely by the old weights; the swap waits."""
    stub, app, store = env["stub"], env["app"], env["store"]
    serving_version = app.serving.policy_version
    target = env["first"] if serving_version == env["second"] else env["second"]
    stream = stub.GenerateStream(
        inference_pb2.GenerateRequest(
            messages=PROMPT, sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=200)
        )
    )
    first_chunk = next(stream)
    swap = asyncio.run_coroutine_threadsafe(
        app.serving.apply_update(PolicyUpdateEvent(version=target, manifest_sha256=store.manifest_sha256(target))),
        env["loop"].loop,
    )
    chunks = [first_chunk, *stream]
    assert swap.result(60) is True
    tokens = [t for c in chunks for t in c.token_ids]
    assert {c.policy_version for c in chunks} == {serving_version}
    reference = transformers_greedy(store.path(serving_version), list(first_chunk.prompt_token_ids), 200)
    assert tokens == reference[: len(tokens)], "tokens after the swap came from the new weights"
    assert greedy(stub).policy_version == target


def test_immediate_swap_switches_a_running_request_to_the_new_weights_within_a_second(env):
    """swap_mode immediate: the swap happens between two engine steps; the request in flight is
    recomputed on the new weights, and its completion lists both versions."""
    stub, app, store = env["stub"], env["app"], env["store"]
    old = app.serving.policy_version
    new = env["first"] if old == env["second"] else env["second"]
    pause_sum = lambda: REGISTRY.get_sample_value("rlhf_inference_swap_pause_seconds_sum") or 0.0
    app.serving.cfg = dataclasses.replace(app.serving.cfg, swap_mode="immediate")
    try:
        stream = stub.GenerateStream(
            inference_pb2.GenerateRequest(
                messages=PROMPT, sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=200)
            )
        )
        first_chunk = next(stream)
        paused_before = pause_sum()
        swapped = asyncio.run_coroutine_threadsafe(
            app.serving.apply_update(PolicyUpdateEvent(version=new, manifest_sha256=store.manifest_sha256(new))),
            env["loop"].loop,
        )
        assert swapped.result(30) is True
        chunks = [first_chunk, *stream]
    finally:
        app.serving.cfg = dataclasses.replace(app.serving.cfg, swap_mode="drain")
    assert pause_sum() - paused_before < 1.0, "an immediate swap must not hold requests for a second"
    tokens = [t for c in chunks for t in c.token_ids]
    prompt = list(first_chunk.prompt_token_ids)
    old_path = transformers_greedy(store.path(old), prompt, len(tokens))
    split = next((i for i, (a, b) in enumerate(zip(tokens, old_path)) if a != b), len(tokens))
    if split < len(tokens):  # the rest must be exactly the new weights' continuation
        assert tokens[split:] == transformers_greedy(store.path(new), prompt + tokens[:split], len(tokens) - split)
    rid = first_chunk.response_id
    events = consume_events(env["broker"].kafka, COMPLETIONS, lambda e: e.payload.response_id == rid, count=1)
    versions = events[0].payload.policy_versions
    assert versions[0] == old and (versions == [old, new] or split == len(tokens) == 200)
    assert greedy(stub).policy_version == new


def test_corrupt_update_is_refused_and_serving_continues(env):
    stub, store = env["stub"], env["store"]
    bad = publish_reinitialised(store, env["first"], seed=3)
    weights = next(store.path(bad).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip a byte of the last tensor
    weights.write_bytes(bytes(data))
    serving = stub.GetPolicy(inference_pb2.GetPolicyRequest())
    before = refused("CorruptVersionError")

    announce(env, bad, sha=store.manifest_sha256(bad))
    wait_until(lambda: refused("CorruptVersionError") == before + 1, 30, "corrupt update not refused")
    info = stub.GetPolicy(inference_pb2.GetPolicyRequest())
    assert info.policy_version == serving.policy_version
    assert info.refused_updates == serving.refused_updates + 1
    assert greedy(stub).policy_version == serving.policy_version


def test_update_with_a_different_manifest_hash_is_refused(env):
    stub, store = env["stub"], env["store"]
    other = publish_reinitialised(store, env["first"], seed=4)
    serving = stub.GetPolicy(inference_pb2.GetPolicyRequest()).policy_version
    result = env["loop"].run(
        env["app"].serving.apply_update(PolicyUpdateEvent(version=other, manifest_sha256="0" * 64))
    )
    assert result is False
    assert stub.GetPolicy(inference_pb2.GetPolicyRequest()).policy_version == serving


def test_update_with_another_architecture_is_refused(env, tmp_path):
    from shared.models.default_model import DefaultModelSpec, create_default_model

    stub, store = env["stub"], env["store"]
    create_default_model(tmp_path / "wide", DefaultModelSpec(hidden_size=256, num_heads=4, num_kv_heads=4))
    wide = store.publish("policy", tmp_path / "wide", make_current=False).version
    before = refused("IncompatibleWeights")
    serving = stub.GetPolicy(inference_pb2.GetPolicyRequest()).policy_version
    ok = env["loop"].run(
        env["app"].serving.apply_update(PolicyUpdateEvent(version=wide, manifest_sha256=store.manifest_sha256(wide)))
    )
    assert ok is False and refused("IncompatibleWeights") == before + 1
    assert greedy(stub).policy_version == serving


def test_unknown_version_is_refused(env):
    ok = env["loop"].run(
        env["app"].serving.apply_update(PolicyUpdateEvent(version="policy-9999", manifest_sha256="0" * 64))
    )
    assert ok is False


def test_broker_outage_does_not_stop_chat_and_events_arrive_after_it_returns(env):
    stub, app, own = env["stub"], env["app"], env["broker"]
    port = own.broker.port
    own.broker.stop()
    failures = lambda: REGISTRY.get_sample_value("rlhf_kafka_publish_failures_total", {"topic": COMPLETIONS}) or 0.0
    failed_before = failures()

    reply = greedy(stub, max_tokens=8)  # chat keeps working with the broker down
    response_id = reply.completions[0].response_id
    wait_until(lambda: failures() > failed_before, 30, "the failed publish was not counted")
    assert app.publisher.pending >= 1, "the event must wait in the outbox, not be dropped"

    restarted = EmbeddedBroker(port=port).start()  # memory storage: topics must be created again
    own.broker = restarted
    ensure_topics(own.kafka)
    assert app.publisher.flush(60), "the outbox did not drain after the broker came back"
    events = consume_events(own.kafka, COMPLETIONS, lambda e: e.payload.response_id == response_id, count=1)
    assert len(events) == 1 and isinstance(events[0].payload, CompletionEvent)
    assert events[0].payload.policy_version == reply.policy_version
