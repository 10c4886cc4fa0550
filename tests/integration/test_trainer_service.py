"""The trainer service end to end with real parts: an embedded broker of its own, a real vLLM
inference service, a real reward service (rm-0001 trained offline on the shipped rankings), the
trainer's gRPC server on loopback. One user prompt becomes a published policy version that
inference then serves; a candidate beyond the KL bound is not published; a stopped trainer resumes
from its checkpoint, and so does a SIGKILLed trainer process (ignoring what the kill left half
written); rollback serves an earlier version again."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from services.reward.offline import EXAMPLE_RANKINGS, OFFLINE_SETTINGS, train_first_rm
from services.trainer.ppo_config import PPOConfig
from shared.config import ModelStoreConfig, load_config
from shared.events import CompletionEvent, PolicyUpdateEvent
from shared.kafka.embedded import free_port
from shared.kafka.topics import COMPLETIONS, POLICY_UPDATES
from shared.model_store import ModelStore
from shared.pb import common_pb2, inference_pb2, inference_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.conftest import (
    TEST_CALLER_TOKENS,
    LoopThread,
    consume_events,
    grpc_channel,
    start_broker,
    start_inference,
    test_auth,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER_QUESTION = "What is 321 plus 654?"  # not in the trainer's prompt file (numbers there are below 100)


@pytest.fixture(scope="module")
def own_broker():
    """A broker of this module's own: its policy announcements must not reach other tests' engines."""
    b = start_broker()
    yield b
    b.broker.stop()


@pytest.fixture(scope="module")
def store(policy_store, tmp_path_factory):
    """A store of our own: a copy of the default policy-0001, then rm-0001 trained from it."""
    store = ModelStore(tmp_path_factory.mktemp("trainer-models"))
    copy = tmp_path_factory.mktemp("trainer-policy-copy") / "policy"
    shutil.copytree(policy_store.store.path(policy_store.first), copy, ignore=shutil.ignore_patterns("manifest.*"))
    store.publish("policy", copy, extra={"copied_from": policy_store.first})
    train_first_rm(store, EXAMPLE_RANKINGS, epochs=1, settings=OFFLINE_SETTINGS)
    return store


@pytest.fixture(scope="module")
def services(own_broker, store):
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    loop = LoopThread()
    inference = start_inference(loop, own_broker.kafka, store.root)
    # Scoring only: the reward service's own continual learner is not under test here.
    no_learner = {"learner": False} if "learner" in RewardConfig.__dataclass_fields__ else {}
    reward_cfg = load_config(
        RewardConfig,
        {},
        grpc_port=0,
        metrics_port=0,
        kafka=own_broker.kafka,
        model_store=ModelStoreConfig(root=store.root),
        torch_threads=1,
        auth=test_auth(),
        **no_learner,
    )

    async def make_reward():
        app = RewardApp(reward_cfg)
        await app.start()
        return app

    reward = loop.run(make_reward(), timeout=120)
    yield loop, inference, reward
    loop.run(reward.stop())
    loop.run(inference.stop())
    loop.close()


class Trainer:
    """A TrainerApp on the services' loop, with a gRPC stub to it."""

    def __init__(self, loop: LoopThread, cfg):
        from services.trainer.app import TrainerApp

        self.loop = loop

        async def make():
            app = TrainerApp(cfg)
            await app.start()
            return app

        self.app = loop.run(make(), timeout=300)
        self.channel = grpc_channel(self.app.address, "operator")
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)

    def status(self) -> trainer_pb2.TrainerStatus:
        return self.stub.Status(trainer_pb2.StatusRequest(), timeout=10)

    def stop(self) -> None:
        self.channel.close()
        self.loop.run(self.app.stop(), timeout=300)


def trainer_config(own_broker, store, services, checkpoint_dir, **overrides):
    from services.trainer.config import TrainerConfig

    _, inference, reward = services
    settings = dict(
        grpc_port=0,
        metrics_port=0,
        kafka=own_broker.kafka,
        model_store=ModelStoreConfig(root=store.root),
        inference_address=inference.address,
        reward_address=reward.address,
        checkpoint_dir=checkpoint_dir,
        rollouts_per_iteration=4,
        max_tokens=16,
        heldout_prompts=4,
        heldout_max_tokens=16,
        publish_every=1,
        checkpoint_every=1,
        idle_sleep_s=0.5,
        # Full speed while no user is around (the default idle budget, 0.25, would slow these tests 4x;
        # test_trainer_yields.py tests yielding).
        idle_budget=1.0,
        torch_threads=1,
        kl_bound=1e6,
        reward_tolerance=1e6,
        ppo=PPOConfig(epochs=2, minibatch_size=4, lr=1e-3, forward_batch_size=4),
        consumer_group=f"trainer-test-{time.monotonic_ns()}",
        auth=test_auth("trainer"),
    )
    settings.update(overrides)
    return load_config(TrainerConfig, {}, **settings)


def generate(inference_address: str, question: str) -> inference_pb2.GenerateResponse:
    with grpc_channel(inference_address, "gateway") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        return stub.Generate(
            inference_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role="user", content=question)],
                sampling=inference_pb2.SamplingParams(max_tokens=8),
                source="user",
            ),
            timeout=60,
        )


def served_version(inference_address: str) -> str:
    with grpc_channel(inference_address, "gateway") as channel:
        return (
            inference_pb2_grpc.InferenceServiceStub(channel)
            .GetPolicy(inference_pb2.GetPolicyRequest(), timeout=10)
            .policy_version
        )


def test_a_user_prompt_becomes_a_published_version_that_inference_serves(own_broker, store, services, tmp_path):
    loop, inference, _ = services
    first = store.current("policy")
    assert generate(inference.address, USER_QUESTION).policy_version == first

    # Live prompts as much as there are: the one user question above is in every batch.
    trainer = Trainer(
        loop,
        trainer_config(own_broker, store, services, tmp_path / "ckpt", live_prompt_fraction=1.0, start_paused=True),
    )
    try:
        # Paused until the consumer group has read the user's completion off rlhf.completions.
        wait_until(lambda: trainer.status().live_prompts == 1, 60, "the user prompt did not reach the trainer")
        trainer.stub.Resume(trainer_pb2.ResumeRequest(), timeout=10)
        wait_until(lambda: trainer.status().last_published.version != "", 240, "nothing was published")
        status = trainer.stub.Pause(trainer_pb2.PauseRequest(), timeout=10)
    finally:
        trainer.stop()
    # An iteration in progress at Pause finishes (and may publish once more) before stop returns.
    final = trainer.app.loop.state
    iterations, published = final.step, final.last_published["version"]
    assert status.paused and status.live_prompts == 1 and status.reference_policy_version == first
    assert final.lineage[0] == first and final.lineage[-1] == published and len(final.lineage) >= 2
    assert store.manifest(final.lineage[1]).parent == first
    # Trained on rollouts of the user's prompt, sampled through inference as "trainer" traffic.
    completions = [
        e.payload
        for e in consume_events(
            own_broker.kafka, COMPLETIONS, lambda e: isinstance(e.payload, CompletionEvent), count=10_000, timeout=8
        )
    ]
    rollouts = [c for c in completions if c.source == "trainer"]
    assert len(rollouts) >= 4, [(c.source, c.messages) for c in completions]
    seen = [(c.messages[-1].content, len(c.token_ids), len(c.logprobs or [])) for c in rollouts]
    assert all(n_tokens == n_logprobs > 0 for _, n_tokens, n_logprobs in seen), seen
    # One distinct live prompt: one of each batch of 4 is live (never repeated), the file fills the rest.
    assert 1 <= sum(q == USER_QUESTION for q, _, _ in seen) <= iterations, seen

    # In the store: verified, current, with its parent, the RM that scored it and the gate's figures.
    manifest = store.verify(published)
    assert store.current("policy") == published and manifest.parent == final.lineage[-2]
    assert manifest.extra["rm_version"] == "rm-0001" and manifest.extra["reference_version"] == first
    assert {"heldout_reward", "kl_to_reference", "baseline_reward"} <= manifest.metrics.keys()

    # Announced, with the manifest's hash; inference verifies it, swaps, and the next answer says so.
    events = consume_events(
        own_broker.kafka,
        POLICY_UPDATES,
        lambda e: isinstance(e.payload, PolicyUpdateEvent) and e.payload.version == published,
        count=1,
        timeout=20,
    )
    assert events and events[0].payload.manifest_sha256 == store.manifest_sha256(published)
    wait_until(lambda: served_version(inference.address) == published, 120, "inference did not swap")
    assert generate(inference.address, USER_QUESTION).policy_version == published


def test_a_candidate_beyond_the_kl_bound_is_not_published(own_broker, store, services, tmp_path):
    loop, _, _ = services
    versions = store.versions("policy")
    current = store.current("policy")
    trainer = Trainer(
        loop, trainer_config(own_broker, store, services, tmp_path / "ckpt", kl_bound=0.0, live_prompt_fraction=0.0)
    )
    try:
        wait_until(lambda: trainer.status().last_gate.step >= 1, 240, "no gate decision")
        status = trainer.stub.Pause(trainer_pb2.PauseRequest(), timeout=10)
    finally:
        trainer.stop()
    gate = status.last_gate
    assert not gate.published and "exceeds the bound" in gate.reason and gate.kl > 0.0, gate
    assert not status.last_published.version
    assert store.versions("policy") == versions and store.current("policy") == current


def test_a_trainer_past_the_kl_bound_reverts_to_the_published_weights_and_publishes_once_within_it(
    own_broker, store, services, tmp_path
):
    """Every candidate past a KL bound of 0: each refusal returns the learner to the published
    weights (counted, checkpointed); restarted from that checkpoint with a bound it keeps within,
    the trainer publishes again, building on the version it reverted to."""
    from prometheus_client import REGISTRY

    from services.trainer.checkpoint import CheckpointStore

    loop, _, _ = services
    ckpt = tmp_path / "ckpt"
    head = store.current("policy")
    versions = store.versions("policy")

    def reverts() -> float:
        return REGISTRY.get_sample_value("rlhf_trainer_reverts_total", {"reason": "kl_bound"}) or 0.0

    before = reverts()
    cfg = dict(live_prompt_fraction=0.0, revert_after_refusals=2)
    trainer = Trainer(loop, trainer_config(own_broker, store, services, ckpt, kl_bound=0.0, **cfg))
    try:
        wait_until(lambda: reverts() >= before + 2, 240, "the trainer did not revert")
        trainer.stub.Pause(trainer_pb2.PauseRequest(), timeout=10)
    finally:
        trainer.stop()
    saved = CheckpointStore(ckpt).load_latest().state["loop"]
    assert saved["reverts"] >= 2 and saved["lineage"] == [head] and saved["depth"] <= 1
    assert store.versions("policy") == versions

    again = Trainer(loop, trainer_config(own_broker, store, services, ckpt, kl_bound=1e6, **cfg))
    try:
        wait_until(lambda: again.status().last_published.version != "", 240, "did not publish within the bound")
        status = again.stub.Pause(trainer_pb2.PauseRequest(), timeout=10)
    finally:
        again.stop()
    assert status.last_gate.published and status.last_published.parent == head


def test_a_stopped_trainer_resumes_from_its_checkpoint(own_broker, store, services, tmp_path):
    loop, _, _ = services
    ckpt = tmp_path / "ckpt"
    cfg = trainer_config(own_broker, store, services, ckpt, publish_every=0, live_prompt_fraction=0.0)
    trainer = Trainer(loop, cfg)
    try:
        wait_until(lambda: trainer.status().step >= 2, 240, "did not train two iterations")
    finally:
        trainer.stop()  # the iteration in progress finishes, then a last checkpoint
    from services.trainer.checkpoint import CheckpointStore

    saved = CheckpointStore(ckpt).steps()[-1]
    assert saved >= 2

    again = Trainer(
        loop,
        trainer_config(own_broker, store, services, ckpt, publish_every=0, live_prompt_fraction=0.0, start_paused=True),
    )
    try:
        status = again.status()
        assert status.step == saved and status.paused and status.checkpoint_step == saved
        again.stub.Resume(trainer_pb2.ResumeRequest(), timeout=10)
        wait_until(lambda: again.status().step > saved, 120, "did not continue after resuming")
    finally:
        again.stop()


def test_rollback_serves_an_earlier_version_again(own_broker, store, services, tmp_path, capsys):
    from services.trainer import control

    loop, inference, _ = services
    first = store.versions("policy")[0]
    trainer = Trainer(
        loop,
        trainer_config(own_broker, store, services, tmp_path / "ckpt", start_paused=True, live_prompt_fraction=0.0),
    )
    try:
        with pytest.raises(grpc.RpcError) as err:
            trainer.stub.Rollback(trainer_pb2.RollbackRequest(policy_version="policy-9999"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            trainer.stub.Rollback(trainer_pb2.RollbackRequest(policy_version="../etc"), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        result = trainer.stub.Rollback(trainer_pb2.RollbackRequest(policy_version=first), timeout=120)
        assert result.published and result.version.version == first
        assert store.current("policy") == first and trainer.status().base_policy_version == first
        capsys.readouterr()
        # The shell client: without the operator's credential it is refused; with it, it works.
        nobody = ["--token-file", str(tmp_path / "no-token")]
        assert control.main(["status", "--address", trainer.app.address, *nobody]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        token_file = tmp_path / "operator-token"
        token_file.write_text(TEST_CALLER_TOKENS["operator"] + "\n")
        assert control.main(["status", "--address", trainer.app.address, "--token-file", str(token_file)]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["basePolicyVersion"] == first and shown["lastGate"]["reason"] == f"rolled back to {first}"
        wait_until(lambda: served_version(inference.address) == first, 120, "inference did not roll back")
    finally:
        trainer.stop()


def trainer_process(own_broker, store, services, ckpt, log_path, **env_overrides) -> tuple[subprocess.Popen, str]:
    """`python -m services.trainer` as its own process (so it can be SIGKILLed), configured by env vars."""
    _, inference, reward = services
    port = free_port()
    k = own_broker.kafka
    env = {
        **os.environ,
        "RLHF_KAFKA_BOOTSTRAP_SERVERS": k.bootstrap_servers,
        "RLHF_KAFKA_SESSION_TIMEOUT_MS": str(k.session_timeout_ms),
        "RLHF_KAFKA_HEARTBEAT_INTERVAL_MS": str(k.heartbeat_interval_ms),
        "RLHF_KAFKA_DELIVERY_TIMEOUT_S": str(k.delivery_timeout_s),
        "RLHF_KAFKA_REQUEST_TIMEOUT_MS": str(k.request_timeout_ms),
        "RLHF_MODEL_STORE_ROOT": str(store.root),
        "RLHF_TRAINER_GRPC_PORT": str(port),
        "RLHF_TRAINER_METRICS_PORT": "0",
        "RLHF_TRAINER_INFERENCE_ADDRESS": inference.address,
        "RLHF_TRAINER_REWARD_ADDRESS": reward.address,
        "RLHF_TRAINER_CHECKPOINT_DIR": str(ckpt),
        "RLHF_TRAINER_ROLLOUTS_PER_ITERATION": "4",
        "RLHF_TRAINER_MAX_TOKENS": "16",
        "RLHF_TRAINER_HELDOUT_PROMPTS": "4",
        "RLHF_TRAINER_HELDOUT_MAX_TOKENS": "16",
        "RLHF_TRAINER_PUBLISH_EVERY": "0",
        "RLHF_TRAINER_CHECKPOINT_EVERY": "1",
        "RLHF_TRAINER_LIVE_PROMPT_FRACTION": "0",
        "RLHF_TRAINER_TORCH_THREADS": "1",
        "RLHF_TRAINER_IDLE_SLEEP_S": "0.5",
        "RLHF_TRAINER_IDLE_BUDGET": "1",
        "RLHF_TRAINER_GRACE_PERIOD_S": "5",
        "RLHF_PPO_EPOCHS": "1",
        "RLHF_PPO_MINIBATCH_SIZE": "4",
        "RLHF_PPO_LR": "0.001",
        "RLHF_AUTH_TOKEN": test_auth("trainer").token,
        "RLHF_AUTH_ACCEPT": ",".join(test_auth().accept),
        **env_overrides,
    }
    log = open(log_path, "ab")  # noqa: SIM115 - the child process holds it
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.trainer"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
    )
    log.close()
    return proc, f"127.0.0.1:{port}"


def status_of(address: str) -> trainer_pb2.TrainerStatus | None:
    try:
        with grpc_channel(address, "operator") as channel:
            return trainer_pb2_grpc.TrainerServiceStub(channel).Status(trainer_pb2.StatusRequest(), timeout=5)
    except grpc.RpcError:
        return None  # not listening yet, or still loading (UNAVAILABLE)


def test_a_killed_trainer_resumes_from_its_last_complete_checkpoint(own_broker, store, services, tmp_path):
    from services.trainer.checkpoint import CheckpointStore

    ckpt, log_path = tmp_path / "ckpt", tmp_path / "trainer.log"
    proc, address = trainer_process(own_broker, store, services, ckpt, log_path)
    try:
        wait_until(
            lambda: (s := status_of(address)) is not None and s.checkpoint_step >= 2,
            300,
            f"no second checkpoint; log: {log_path}",
            interval=0.5,
        )
    finally:
        proc.kill()  # SIGKILL: no drain, no last checkpoint
        proc.wait(30)
    checkpoints = CheckpointStore(ckpt)
    saved = checkpoints.load_latest().step
    assert saved >= 2
    # What a kill during a save leaves behind: a temp directory, or (had the rename been reached
    # without a manifest) a newer checkpoint directory without one. Neither may be loaded.
    (ckpt / ".tmp-killed").mkdir()
    shutil.copytree(checkpoints.path(saved), checkpoints.path(saved + 1))
    (checkpoints.path(saved + 1) / "manifest.json").unlink()

    proc, address = trainer_process(own_broker, store, services, ckpt, log_path, RLHF_TRAINER_START_PAUSED="1")
    try:
        wait_until(lambda: status_of(address) is not None, 300, f"did not restart; log: {log_path}", interval=0.5)
        status = status_of(address)
        assert status.step == saved and status.paused, status
        assert not (ckpt / ".tmp-killed").exists()
        with grpc_channel(address, "operator") as channel:
            trainer_pb2_grpc.TrainerServiceStub(channel).Resume(trainer_pb2.ResumeRequest(), timeout=10)
        wait_until(lambda: status_of(address).step > saved, 120, "did not continue", interval=0.5)
        proc.send_signal(signal.SIGTERM)  # drains and stops cleanly
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert "skipping unusable checkpoint" in log_path.read_text()


def test_without_a_reward_model_the_trainer_waits_not_serving_and_stops_on_request(own_broker, tmp_path):
    from grpc_health.v1 import health_pb2

    from services.trainer.app import TrainerApp
    from services.trainer.config import TrainerConfig

    cfg = load_config(
        TrainerConfig,
        {},
        grpc_port=0,
        metrics_port=0,
        kafka=own_broker.kafka,
        model_store=ModelStoreConfig(root=tmp_path / "empty-store"),
        checkpoint_dir=tmp_path / "ckpt",
        live_prompt_fraction=0.0,
        auth=test_auth(),
    )
    loop = LoopThread()
    try:

        async def make():
            return TrainerApp(cfg)  # on the loop: a grpc.aio server belongs to the loop that makes it

        app = loop.run(make())
        starting = asyncio.run_coroutine_threadsafe(app.start(), loop.loop)
        wait_until(lambda: app.server.port > 0 and health_of(app.address) is not None, 30, "not listening")
        assert health_of(app.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc_channel(app.address, "operator") as channel, pytest.raises(grpc.RpcError) as err:
            trainer_pb2_grpc.TrainerServiceStub(channel).Status(trainer_pb2.StatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        loop.loop.call_soon_threadsafe(app.server.request_stop)  # what SIGTERM does
        starting.result(30)  # start gives up waiting for models
        loop.run(app.stop(), timeout=60)
        assert app.loop is None
    finally:
        loop.close()


def health_of(address: str):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError:
        return None


def test_a_guard_refusal_blocks_publication_and_status_carries_each_guard(own_broker, store, services, tmp_path):
    loop, _, _ = services
    (tmp_path / "op_guard_checks.py").write_text(
        "def broken(prompts, answers):\n    raise RuntimeError('the check cannot run')\n"
    )
    sys.path.insert(0, str(tmp_path))
    versions = store.versions("policy")
    try:
        cfg = trainer_config(
            own_broker,
            store,
            services,
            tmp_path / "ckpt",
            live_prompt_fraction=0.0,
            heldout_samples=2,
            guards=("frozen_rm:rm-0001:1000", "entry:op_guard_checks:broken:0.5"),
        )
        trainer = Trainer(loop, cfg)
        try:
            wait_until(lambda: trainer.status().last_gate.step >= 1, 240, "no gate decision")
            status = trainer.stub.Pause(trainer_pb2.PauseRequest(), timeout=10)
        finally:
            trainer.stop()
    finally:
        sys.path.remove(str(tmp_path))
    gate = status.last_gate
    assert not gate.published and gate.reason.startswith("guard entry:op_guard_checks:broken: the check raised")
    frozen, entry = gate.guards
    assert frozen.name == "frozen_rm:rm-0001" and frozen.passed and frozen.HasField("baseline")
    assert entry.name == "entry:op_guard_checks:broken" and not entry.passed
    assert store.versions("policy") == versions


def test_a_frozen_rm_guard_the_store_lacks_is_a_config_error_naming_the_variable(own_broker, store, services, tmp_path):
    from services.trainer.app import TrainerApp
    from shared.config import ConfigError

    cfg = trainer_config(own_broker, store, services, tmp_path / "ckpt", guards=("frozen_rm:rm-0042:0.1",))

    async def build() -> None:  # on a loop: TrainerApp makes a grpc.aio server, which belongs to one
        TrainerApp(cfg)._build_guards()

    with pytest.raises(ConfigError, match="RLHF_TRAINER_GUARDS: frozen_rm:rm-0042: cannot load the reward model"):
        asyncio.run(build())
