"""Hot-swapping policy weights in a running vLLM engine, refusing bad updates (corrupt, unsigned,
signed by another key, tampered, replayed, older), loading only the bytes that were verified, and
surviving a broker outage: real broker, real engine, real gRPC on loopback. The replica verifies with
the test suite's policy key (the versions of ``policy_store`` are signed with it)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import shutil
from contextlib import contextmanager

import blake3
import pytest
from prometheus_client import REGISTRY

from shared.events import CompletionEvent, PolicyUpdateEvent
from shared.kafka.admin import ensure_topics
from shared.kafka.embedded import EmbeddedBroker
from shared.kafka.publishers import KafkaPublisher
from shared.kafka.topics import COMPLETIONS, POLICY_UPDATES
from shared.model_store import version_number
from shared.pb import common_pb2, inference_pb2, inference_pb2_grpc
from shared.signing import SigningKey
from shared.version_line import POLICY, Announcement, VersionLine
from tests.conftest import (
    LoopThread,
    consume_events,
    grpc_channel,
    publish_reinitialised,
    start_broker,
    start_inference,
    test_signing_key,
    test_versions,
    transformers_greedy,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = [common_pb2.ChatMessage(role="user", content="What is 9 plus 4?")]


SEQUENCE = itertools.count(100)
"""Announcement numbers of this module's publisher (above the store's record: policy_store's is 1)."""


@pytest.fixture(scope="module")
def env(policy_store, tmp_path_factory):
    own = start_broker()  # this module stops and restarts its broker
    loop = LoopThread()
    copies = tmp_path_factory.mktemp("inference-copies")
    app = start_inference(loop, own.kafka, policy_store.root, versions=test_versions(copies_dir=copies))
    channel = grpc_channel(app.address, "gateway")
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


def update(
    env, version: str, *, sha: str | None = None, reason: str | None = None, key: SigningKey | None = None
) -> PolicyUpdateEvent:
    """The announcement the trainer would sign: the next sequence number, "rollback" for a version
    older than the one served (unless ``reason`` says otherwise), signed with ``key`` (the test key)."""
    serving = env["app"].serving.policy_version
    if reason is None:
        reason = "rollback" if version_number(version) < version_number(serving) else "publish"
    sha = sha or env["store"].manifest_sha256(version)
    signed = Announcement("policy", version, sha, reason, next(SEQUENCE)).signed_by(key or test_signing_key())
    return POLICY.make_event(signed, None, {})


def announce(env, version: str, sha: str | None = None, event: PolicyUpdateEvent | None = None) -> PolicyUpdateEvent:
    """Send a signed announcement of ``version`` (or ``event`` as it is) on rlhf.policy-updates."""
    event = event or update(env, version, sha=sha)
    publisher = KafkaPublisher(env["broker"].kafka, "test")
    publisher.publish_and_wait(POLICY_UPDATES, event, key="policy")
    publisher.close()
    return event


def apply(env, event: PolicyUpdateEvent) -> bool:
    return env["loop"].run(env["app"].serving.apply_update(event))


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


def pause_sum() -> float:
    return REGISTRY.get_sample_value("rlhf_inference_swap_pause_seconds_sum") or 0.0


def swapped_under() -> float:
    return REGISTRY.get_sample_value("rlhf_inference_swapped_under_requests_total") or 0.0


@contextmanager
def swap_mode(app, mode: str):
    """Run with RLHF_INFERENCE_SWAP_MODE=``mode`` (the default is bounded), then restore it."""
    served = app.serving.cfg
    app.serving.cfg = dataclasses.replace(served, swap_mode=mode)
    try:
        yield
    finally:
        app.serving.cfg = served


def test_request_in_flight_finishes_on_the_weights_it_started_with(env):
    """swap_mode drain: a stream admitted before a swap is generated entirely by the old weights; the
    swap waits for it, however long it runs."""
    stub, app, store = env["stub"], env["app"], env["store"]
    serving_version = app.serving.policy_version
    target = env["first"] if serving_version == env["second"] else env["second"]
    with swap_mode(app, "drain"):
        stream = stub.GenerateStream(
            inference_pb2.GenerateRequest(
                messages=PROMPT, sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=200)
            )
        )
        first_chunk = next(stream)
        swap = asyncio.run_coroutine_threadsafe(
            app.serving.apply_update(update(env, target)),
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
    with swap_mode(app, "immediate"):
        stream = stub.GenerateStream(
            inference_pb2.GenerateRequest(
                messages=PROMPT, sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=200)
            )
        )
        first_chunk = next(stream)
        paused_before = pause_sum()
        swapped = asyncio.run_coroutine_threadsafe(
            app.serving.apply_update(update(env, new)),
            env["loop"].loop,
        )
        assert swapped.result(30) is True
        chunks = [first_chunk, *stream]
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


def test_the_default_swap_pauses_under_a_second_and_the_long_request_lists_both_versions(env):
    """Default swap_mode bounded, one replica: a swap with a long generation in flight waits only its
    drain budget (not for that generation), so new requests are held under a second; the long
    request is recomputed on the new weights, continues with exactly their tokens, and its
    completion names both versions."""
    stub, app, store = env["stub"], env["app"], env["store"]
    assert app.serving.cfg.swap_mode == "bounded" and app.serving.cfg.swap_drain_budget_s < 1
    # A budget well under the generation's length: on a quiet machine the tiny model writes 256
    # tokens in about the default 0.3 s, and the request must still be running when it ends.
    served = app.serving.cfg
    app.serving.cfg = dataclasses.replace(served, swap_drain_budget_s=0.05)
    try:
        bounded_swap_under_a_long_request(env, stub, app, store)
    finally:
        app.serving.cfg = served


def bounded_swap_under_a_long_request(env, stub, app, store) -> None:
    old = app.serving.policy_version
    new = env["first"] if old == env["second"] else env["second"]
    stream = stub.GenerateStream(
        inference_pb2.GenerateRequest(
            messages=PROMPT, sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=256)
        )
    )
    first_chunk = next(stream)
    paused_before, under_before = pause_sum(), swapped_under()
    swapped = asyncio.run_coroutine_threadsafe(app.serving.apply_update(update(env, new)), env["loop"].loop)
    assert swapped.result(30) is True
    pause = pause_sum() - paused_before
    chunks = [first_chunk, *stream]
    tokens = [t for c in chunks for t in c.token_ids]
    assert swapped_under() == under_before + 1, "the long request was still running: it was swapped under"
    assert app.serving.cfg.swap_drain_budget_s <= pause < 1.0, f"pause {pause:.3f} s"
    prompt = list(first_chunk.prompt_token_ids)
    old_path = transformers_greedy(store.path(old), prompt, len(tokens))
    split = next((i for i, (a, b) in enumerate(zip(tokens, old_path)) if a != b), len(tokens))
    # From where the answer leaves the old weights' path it follows the new weights exactly. (When
    # both versions' greedy paths agree from the swap to the end, nothing leaves it: the event's
    # versions below and the swapped-under count above still show the swap under the request.)
    assert tokens[split:] == transformers_greedy(store.path(new), prompt + tokens[:split], len(tokens) - split)
    rid = first_chunk.response_id
    events = consume_events(env["broker"].kafka, COMPLETIONS, lambda e: e.payload.response_id == rid, count=1)
    assert events[0].payload.policy_versions == [old, new]
    print(f"\nbounded swap: pause {pause * 1e3:.0f} ms with a {len(tokens)}-token generation in flight")
    assert greedy(stub).policy_version == new


def test_corrupt_update_is_refused_and_serving_continues(env):
    stub, store = env["stub"], env["store"]
    bad = publish_reinitialised(store, env["first"], seed=3)
    weights = next(store.path(bad).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip a byte of the last tensor
    weights.write_bytes(bytes(data))
    serving = stub.GetPolicy(inference_pb2.GetPolicyRequest())
    before = refused("staged_corrupt")  # the engine's worker reads the weights and checks their digest

    announce(env, bad, sha=store.manifest_sha256(bad))
    wait_until(lambda: refused("staged_corrupt") == before + 1, 30, "corrupt update not refused")
    info = stub.GetPolicy(inference_pb2.GetPolicyRequest())
    assert info.policy_version == serving.policy_version
    assert info.refused_updates == serving.refused_updates + 1
    assert greedy(stub).policy_version == serving.policy_version


def test_update_with_a_different_manifest_hash_is_refused(env):
    stub, store = env["stub"], env["store"]
    other = publish_reinitialised(store, env["first"], seed=4)
    serving = stub.GetPolicy(inference_pb2.GetPolicyRequest()).policy_version
    assert apply(env, update(env, other, sha="0" * 64)) is False
    assert stub.GetPolicy(inference_pb2.GetPolicyRequest()).policy_version == serving


def test_update_with_another_architecture_is_refused(env, tmp_path):
    from shared.models.default_model import DefaultModelSpec, create_default_model

    stub, store = env["stub"], env["store"]
    create_default_model(tmp_path / "wide", DefaultModelSpec(hidden_size=256, num_heads=4, num_kv_heads=4))
    line = VersionLine(store, POLICY, signer=test_signing_key())
    wide = line.publish(tmp_path / "wide", make_current=False).version
    before = refused("IncompatibleWeights")
    serving = stub.GetPolicy(inference_pb2.GetPolicyRequest()).policy_version
    assert apply(env, update(env, wide)) is False and refused("IncompatibleWeights") == before + 1
    assert greedy(stub).policy_version == serving


def test_unknown_version_is_refused(env):
    assert apply(env, update(env, "policy-9999", sha="0" * 64, reason="publish")) is False


# --- authenticity, order, and the bytes loaded ------------------------------------------------------


def serving_now(env) -> str:
    return env["stub"].GetPolicy(inference_pb2.GetPolicyRequest()).policy_version


def test_unsigned_foreign_and_altered_announcements_never_reach_serving(env):
    store = env["store"]
    target = publish_reinitialised(store, env["first"], seed=7)
    serving, before = serving_now(env), refused("bad_signature")
    good = update(env, target)
    unsigned = dataclasses.replace(good, key_id="", signature="")
    foreign = update(env, target, key=SigningKey.generate())
    altered = dataclasses.replace(good, manifest_sha256="0" * 64)
    for event in (unsigned, foreign, altered):
        assert apply(env, event) is False
    assert refused("bad_signature") == before + 3 and serving_now(env) == serving
    # Over Kafka the same: refused, counted, never swapped.
    announce(env, target, event=dataclasses.replace(update(env, target), signature=unsigned.signature))
    wait_until(lambda: refused("bad_signature") == before + 4, 30, "the unsigned announcement was not refused")
    assert serving_now(env) == serving and greedy(env["stub"]).policy_version == serving


def test_a_tampered_or_unsigned_version_never_reaches_serving(env):
    store = env["store"]
    tampered = publish_reinitialised(store, env["first"], seed=8)
    other = publish_reinitialised(store, env["first"], seed=9)
    # Someone with write access to the store replaces the weights and rewrites the manifest to match.
    weights = next(store.path(tampered).glob("*.safetensors"))
    shutil.copyfile(next(store.path(other).glob("*.safetensors")), weights)
    manifest = store.path(tampered) / "manifest.json"
    text = manifest.read_text()
    old_digest = store.manifest(tampered).files[weights.name].hex
    manifest.write_text(text.replace(old_digest, blake3.blake3(weights.read_bytes()).hexdigest()))
    (store.path(other) / "manifest.sig").unlink()  # and strips a version's signature
    serving, before = serving_now(env), refused("bad_signature")
    assert apply(env, update(env, tampered)) is False
    assert apply(env, update(env, other)) is False
    assert refused("bad_signature") == before + 2 and serving_now(env) == serving


def test_replayed_and_older_announcements_never_reach_serving(env):
    store = env["store"]
    newer = publish_reinitialised(store, env["first"], seed=10)
    served = serving_now(env)
    first = announce(env, newer)
    wait_until(lambda: serving_now(env) == newer, 60, "the signed announcement was not applied")
    before = refused("replayed"), refused("not_newer")
    announce(env, served, event=update(env, served, reason="publish"))  # older, as a publish
    wait_until(lambda: refused("not_newer") == before[1] + 1, 30, "an older publish was not refused")
    rollback = announce(env, served, event=update(env, served, reason="rollback"))  # a signed rollback
    wait_until(lambda: serving_now(env) == served, 60, "the signed rollback was not applied")
    announce(env, newer, event=first)  # the old announcement replayed: no swap back
    wait_until(lambda: refused("replayed") == before[0] + 1, 30, "the replay was not refused")
    assert apply(env, rollback) is False  # the rollback replayed: the version served, ignored
    assert serving_now(env) == served and greedy(env["stub"]).policy_version == served


def test_the_engine_loads_the_verified_bytes_even_if_the_store_changes_after_the_check(env):
    """The weights are read from the store once, by the engine's worker, and checked as they are
    read: a file swapped after that is never read again (the verified bytes are served), and one
    swapped before it is refused (the old version keeps serving). No weight bytes are copied."""
    store, app = env["store"], env["app"]
    target = publish_reinitialised(store, env["first"], seed=11)
    impostor = publish_reinitialised(store, env["first"], seed=12)
    probe = greedy(env["stub"])
    expected = transformers_greedy(store.path(target), list(probe.prompt_token_ids), 24)
    assert expected != transformers_greedy(store.path(impostor), list(probe.prompt_token_ids), 24)
    weights = next(store.path(target).glob("*.safetensors"))
    original = weights.read_bytes()
    engine = app.serving.engine
    real_load, real_stage = engine.load_staged, engine.stage_weights

    async def swap_the_file_then_load(token, expected_signature, **kwargs):
        # After the worker read and checked the bytes, a compromised pod swaps the store's file.
        shutil.copyfile(next(store.path(impostor).glob("*.safetensors")), weights)
        return await real_load(token, expected_signature, **kwargs)

    engine.load_staged = swap_the_file_then_load
    try:
        assert apply(env, update(env, target)) is True
    finally:
        engine.load_staged = real_load
    after = greedy(env["stub"])
    assert after.policy_version == target
    assert list(after.completions[0].token_ids) == expected[: len(after.completions[0].token_ids)]
    held = app.serving.versions.private
    assert len(held.held) <= 2 and held.bytes_held < len(original)  # config and tokenizer, not the weights

    newer = publish_reinitialised(store, env["first"], seed=13)
    newer_weights = next(store.path(newer).glob("*.safetensors"))
    before = refused("staged_corrupt")

    async def swap_the_file_then_stage(token, files):
        # Between the manifest's check and the worker's read, the store's file is swapped.
        shutil.copyfile(next(store.path(impostor).glob("*.safetensors")), newer_weights)
        return await real_stage(token, files)

    engine.stage_weights = swap_the_file_then_stage
    try:
        assert apply(env, update(env, newer)) is False
    finally:
        engine.stage_weights = real_stage
    assert refused("staged_corrupt") == before + 1
    still = greedy(env["stub"])
    assert still.policy_version == target
    assert list(still.completions[0].token_ids) == expected[: len(still.completions[0].token_ids)]
    weights.write_bytes(original)


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
