"""The rollout service end to end, with real parts: an embedded broker per test (the service reads
rlhf.rollout from its beginning), the feedback service over gRPC, the rollout service over gRPC
with its Kafka followers and gate thread, a real model store with signed versions.

The trainer's part is played by its candidate line (the trainer publishes exactly so in rollout
mode: the candidate pointer set and announced on rlhf.policy-candidates, signed with its key), and
users' ratings go through the feedback service with feedback tokens signed for the version each
user was served, as the gateway signs them. No inference engine is needed for the gate, which
decides on the ratings; the last test starts one real engine in the canary group
(RLHF_INFERENCE_FOLLOW=canary) to show it follows the pointer the rollout service signs.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path

import grpc
import pytest

from flywheel.cli import main as rlhf
from shared.config import ModelStoreConfig, VersionTrustConfig, load_config
from shared.events import PolicyCanaryEvent, PolicyUpdateEvent, RolloutEvent
from shared.feedback_token import TokenClaims, prompt_hash, sign
from shared.kafka.publishers import KafkaPublisher
from shared.kafka.topics import POLICY_CANARY, POLICY_UPDATES, ROLLOUT
from shared.model_store import ModelStore
from shared.pb import feedback_pb2, feedback_pb2_grpc, inference_pb2, inference_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from shared.signing import SigningKey
from shared.version_line import POLICY, POLICY_CANDIDATE, KafkaAnnouncer, VersionLine
from tests.conftest import (
    TEST_CALLER_TOKENS,
    TEST_TOKEN_SECRET,
    LoopThread,
    consume_events,
    grpc_channel,
    start_broker,
    start_feedback,
    start_inference,
    test_auth,
    test_signing_key,
    wait_until,
)

pytestmark = [pytest.mark.integration]

ROLLOUT_SEED = bytes(range(64, 96))
ROLLOUT_KEY = SigningKey.from_bytes(base64.b64encode(ROLLOUT_SEED), "rollout")
TRAINER_KEY = test_signing_key("policy")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def rollout_versions() -> VersionTrustConfig:
    """The rollout service's RLHF_VERSIONS_*: its own signing key; the trainer's and its own public keys."""
    return VersionTrustConfig(
        policy_signing_key=b64(ROLLOUT_SEED),
        policy_verify_keys=",".join(b64(k.public_raw) for k in (TRAINER_KEY, ROLLOUT_KEY)),
    )


class World:
    """Broker, feedback service, model store, the trainer's candidate line, a restartable rollout service."""

    def __init__(self, tmp_path: Path, models: Path | None = None):
        self.broker = start_broker()
        self.kafka = self.broker.kafka
        self.loop = LoopThread()
        self.feedback = start_feedback(self.loop, self.kafka)
        self.feedback_channel = grpc_channel(self.feedback.address, "gateway")
        self.feedback_stub = feedback_pb2_grpc.FeedbackServiceStub(self.feedback_channel)
        self.src = tmp_path / "src"
        self.src.mkdir()
        (self.src / "config.json").write_text("{}")
        (self.src / "model.safetensors").write_bytes(b"\0" * 64)
        if models is None:
            self.store = ModelStore(tmp_path / "models")
            VersionLine(self.store, POLICY, signer=TRAINER_KEY).publish(self.src)  # policy-0001: stable
        else:  # real models (policy-0001 current, policy-0002 published), signed by the trainer's key
            shutil.copytree(models, tmp_path / "models")
            self.store = ModelStore(tmp_path / "models")
        self.trainer_publisher = KafkaPublisher(self.kafka, "trainer")
        self.candidates = VersionLine(
            self.store, POLICY_CANDIDATE, KafkaAnnouncer(self.trainer_publisher, POLICY_CANDIDATE), signer=TRAINER_KEY
        )
        self.rollout = None
        self.settings: dict = {}
        self.channels: list = []
        self.n = 0

    def start_rollout(self, **overrides):
        from services.rollout.app import RolloutApp
        from services.rollout.config import RolloutConfig

        values = dict(
            grpc_port=0,
            metrics_port=0,
            kafka=self.kafka,
            model_store=ModelStoreConfig(root=self.store.root),
            versions=rollout_versions(),
            auth=test_auth(),
            tick_s=0.2,
            rho=5.0,
            margin=0.3,
            min_ratings=20,
            timeout_s=600.0,
        )
        self.settings.update(overrides)
        values.update(self.settings)
        cfg = load_config(RolloutConfig, {}, **values)

        async def make():
            app = RolloutApp(cfg)
            await app.start()
            return app

        self.rollout = self.loop.run(make(), timeout=120)
        return self.rollout

    def stop_rollout(self):
        self.loop.run(self.rollout.stop(), timeout=120)
        self.rollout = None

    def stub(self, caller: str = "operator"):
        channel = grpc_channel(self.rollout.address, caller)
        self.channels.append(channel)
        return rollout_pb2_grpc.RolloutServiceStub(channel)

    def status(self) -> rollout_pb2.RolloutStatus:
        return self.stub().Status(rollout_pb2.RolloutStatusRequest(), timeout=30)

    def publish_candidate(self) -> str:
        version = self.candidates.publish(self.src).version
        assert self.candidates.announce_pending() is not None
        return version

    def rate(self, version: str, ups: int, downs: int) -> None:
        """Thumbs from distinct users, each on a response served to them by ``version``."""
        requests = []
        for up in [True] * ups + [False] * downs:
            self.n += 1
            user, rid = f"user-{self.n}", f"resp-{self.n}"
            ph = prompt_hash([("user", f"question {self.n}")])
            token = sign(TEST_TOKEN_SECRET, TokenClaims(rid, version, ph, int(time.time()) + 3600, principal=user))
            requests.append(
                feedback_pb2.SubmitFeedbackRequest(
                    thumb=feedback_pb2.ThumbRating(
                        response_id=rid, thumb=feedback_pb2.THUMB_UP if up else feedback_pb2.THUMB_DOWN
                    ),
                    feedback_tokens=[token],
                    principal=user,
                )
            )
        reply = self.feedback_stub.SubmitFeedbackBatch(
            feedback_pb2.SubmitFeedbackBatchRequest(submissions=requests), timeout=60
        )
        assert len(reply.results) == len(requests)
        assert all(r.WhichOneof("outcome") != "error" for r in reply.results), reply

    def steps(self, count: int, timeout: float = 30.0) -> list[RolloutEvent]:
        envs = consume_events(self.kafka, ROLLOUT, lambda e: isinstance(e.payload, RolloutEvent), count, timeout)
        return [e.payload for e in envs]

    def wait_for_stage(self, stage: str, version: str, timeout: float = 60.0) -> RolloutEvent:
        found: list[RolloutEvent] = []

        def seen() -> bool:
            found[:] = [e for e in self.steps(1000, timeout=1) if (e.stage, e.version) == (stage, version)]
            return bool(found)

        wait_until(seen, timeout, f"no {stage} step of {version} on {ROLLOUT}", interval=0.2)
        return found[0]

    def close(self):
        if self.rollout is not None:
            self.stop_rollout()
        for channel in self.channels:
            channel.close()
        self.feedback_channel.close()
        self.trainer_publisher.close()
        self.loop.run(self.feedback.stop())
        self.loop.close()
        self.broker.broker.stop()


@pytest.fixture()
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def announcements(world: World, topic: str, kind: type, count: int) -> list:
    return [e.payload for e in consume_events(world.kafka, topic, lambda e: isinstance(e.payload, kind), count, 10)]


def test_a_candidate_becomes_the_canary_and_a_worse_one_is_rolled_back_to_stable(world):
    world.start_rollout()
    # A first start: the canary group is pointed at the stable version.
    assert world.status().stable == "policy-0001" and world.store.pointer("policy", "canary") == "policy-0001"
    version = world.publish_candidate()
    canary = world.wait_for_stage("canary", version)
    assert (canary.stable, canary.canary, canary.canary_share) == ("policy-0001", "policy-0002", 0.1)
    assert canary.evidence["candidate"]["announcement_sequence"] == 1
    wait_until(lambda: world.store.pointer("policy", "canary") == version, 10, "canary pointer not moved")
    [to_stable, to_canary] = announcements(world, POLICY_CANARY, PolicyCanaryEvent, 2)
    assert (to_stable.version, to_canary.version, to_canary.reason) == ("policy-0001", version, "publish")
    assert to_canary.key_id == ROLLOUT_KEY.key_id  # signed by the rollout service, not the trainer
    status = world.status()
    assert (status.canary, status.canary_share, status.latest_candidate) == (version, 0.1, version)

    world.rate("policy-0001", ups=40, downs=0)
    world.rate(version, ups=2, downs=38)
    rolled = world.wait_for_stage("rolled_back", version)
    assert (
        rolled.reason == "worse than the stable version on thumbs" and rolled.canary == "" and rolled.canary_share == 0
    )
    assert rolled.evidence["thumbs"]["verdict"] == "rollback" and rolled.evidence["thumbs"]["canary_n"] == 40
    wait_until(lambda: world.store.pointer("policy", "canary") == "policy-0001", 10, "canary pointer not back")
    back = announcements(world, POLICY_CANARY, PolicyCanaryEvent, 3)[-1]
    assert (back.version, back.reason, back.sequence) == ("policy-0001", "rollback", 3)
    assert world.store.current("policy") == "policy-0001"  # every other user never saw it
    assert world.status().canary == ""


def test_a_better_canary_is_promoted_and_current_is_announced(world):
    world.start_rollout()
    version = world.publish_candidate()
    world.wait_for_stage("canary", version)
    world.rate("policy-0001", ups=10, downs=30)
    world.rate(version, ups=40, downs=0)
    promoted = world.wait_for_stage("promoted", version)
    assert promoted.stable == version and promoted.reason.startswith("non-inferior on thumbs")
    wait_until(lambda: world.store.current("policy") == version, 10, "current not moved")
    [update] = [u for u in announcements(world, POLICY_UPDATES, PolicyUpdateEvent, 1) if u.version == version]
    assert update.reason == "publish" and update.key_id == ROLLOUT_KEY.key_id
    assert world.store.pointer("policy", "canary") == version  # the canary group serves the new stable
    assert world.status().stable == version


def test_a_canary_without_a_conclusion_is_rolled_back_at_its_timeout(world):
    world.start_rollout(timeout_s=3.0)
    version = world.publish_candidate()
    world.wait_for_stage("canary", version)
    world.rate(version, ups=3, downs=0)  # far too little evidence to conclude
    rolled = world.wait_for_stage("rolled_back", version, timeout=30)
    assert rolled.reason == "no conclusion within 3 s" and rolled.evidence["canary"]["thumbs"] == 3
    assert world.store.pointer("policy", "canary") == "policy-0001"


def test_a_restart_mid_canary_keeps_the_state_and_takes_the_same_decision(world):
    world.start_rollout(initial_mode="manual")  # the gate advises; nothing is acted on
    version = world.publish_candidate()
    world.wait_for_stage("canary", version)
    since = world.status().canary_since
    world.rate("policy-0001", ups=40, downs=0)
    world.rate(version, ups=1, downs=39)
    wait_until(lambda: world.status().last_verdict.action == "rollback", 30, "no rollback verdict")
    before = world.status()
    assert before.mode == "manual" and before.canary == version
    world.stop_rollout()

    # A candidate announced while the service is down is not missed (read from the store's record).
    queued = world.publish_candidate()
    world.start_rollout(initial_mode="manual")
    after = world.status()
    assert (after.stable, after.canary, after.canary_since, after.mode) == ("policy-0001", version, since, "manual")
    assert after.queued == queued
    # The evidence since the canary's start is read back: the same counts, the same verdict.
    wait_until(lambda: world.status().last_verdict.action == "rollback", 30, "no verdict after the restart")
    again = world.status()
    assert (again.canary_signals.thumbs, again.stable_signals.thumbs) == (40, 40)
    assert (
        json.loads(again.last_verdict.evidence_json)["thumbs"]
        == json.loads(before.last_verdict.evidence_json)["thumbs"]
    )
    # Auto mode: the gate acts on that verdict; the queued candidate takes the slot.
    world.stub().SetMode(rollout_pb2.RolloutModeRequest(mode="auto"), timeout=30)
    world.wait_for_stage("rolled_back", version)
    world.wait_for_stage("canary", queued)
    wait_until(lambda: world.store.pointer("policy", "canary") == queued, 10, "queued candidate not in canary")


def test_rlhf_rollout_commands_need_the_operator_credential(world, monkeypatch, capsys):
    world.start_rollout(initial_mode="manual")
    version = world.publish_candidate()
    world.wait_for_stage("canary", version)
    address = world.rollout.address

    monkeypatch.setenv("RLHF_OPERATOR_TOKEN", TEST_CALLER_TOKENS["operator"])
    assert rlhf(["rollout", "status", "--address", address]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["canary"] == version and shown["mode"] == "manual"
    assert rlhf(["rollout", "pause", "--address", address]) == 0
    assert json.loads(capsys.readouterr().out)["paused"] is True
    assert rlhf(["rollout", "resume", "--address", address]) == 0
    capsys.readouterr()
    # Refusals name the problem.
    assert rlhf(["rollout", "promote", "policy-0001", "--address", address]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    assert rlhf(["rollout", "promote", "policy-1", "--address", address]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert rlhf(["rollout", "promote", version, "--address", address]) == 0
    assert json.loads(capsys.readouterr().out)["stable"] == version
    world.wait_for_stage("promoted", version)

    # Another caller's credential may read, not act; no credential at all is refused.
    monkeypatch.setenv("RLHF_OPERATOR_TOKEN", TEST_CALLER_TOKENS["monitoring"])
    assert rlhf(["rollout", "status", "--address", address]) == 0
    capsys.readouterr()
    assert rlhf(["rollout", "pause", "--address", address]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    monkeypatch.delenv("RLHF_OPERATOR_TOKEN")
    monkeypatch.setenv("RLHF_OPERATOR_TOKEN_FILE", str(Path(world.store.root) / "no-such-token"))
    assert rlhf(["rollout", "status", "--address", address]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    with pytest.raises(grpc.RpcError) as err:
        world.stub("gateway").SetMode(rollout_pb2.RolloutModeRequest(mode="auto"), timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        world.stub().SetMode(rollout_pb2.RolloutModeRequest(mode="sometimes"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mode" in err.value.details()


@pytest.mark.slow
def test_a_canary_engine_serves_what_the_rollout_service_points_it_at(tmp_path, policy_store):
    """A real vLLM engine in the canary group: it starts on the stable version (no canary pointer
    yet), swaps to the canary once the rollout service announces it (signed with the rollout
    service's key, which the engine trusts beside the trainer's), and back when it is rolled back;
    the stable pointer never moves."""
    w = World(tmp_path, models=policy_store.root)
    engine = None
    try:
        w.start_rollout(initial_mode="manual")
        engine = start_inference(
            w.loop,
            w.kafka,
            w.store.root,
            follow="canary",
            # The policy line's followers trust the trainer's key and the rollout service's.
            versions=VersionTrustConfig(
                policy_verify_keys=rollout_versions().policy_verify_keys, copies_dir=tmp_path / "copies"
            ),
        )
        channel = grpc_channel(engine.address, "gateway")
        w.channels.append(channel)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        def serving() -> str:
            return stub.GetPolicy(inference_pb2.GetPolicyRequest(), timeout=30).policy_version

        stable = w.status().stable
        assert serving() == stable != policy_store.second
        # The trainer's candidate: the second version (published, not current).
        candidates = w.candidates
        candidates.point_to(policy_store.second)
        assert candidates.announce_pending() is not None
        w.wait_for_stage("canary", policy_store.second)
        wait_until(lambda: serving() == policy_store.second, 120, "the canary engine did not swap to the canary")
        w.stub().Rollback(rollout_pb2.RolloutVersionRequest(version=policy_store.second), timeout=30)
        wait_until(lambda: serving() == stable, 120, "the canary engine did not go back to stable")
        assert w.store.current("policy") == stable
        assert engine.serving.versions.refusals == 0, "every announcement the rollout service signed verified"
    finally:
        if engine is not None:
            w.loop.run(engine.stop(), timeout=120)
        w.close()
