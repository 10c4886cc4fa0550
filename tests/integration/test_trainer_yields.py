"""The trainer yields to users: a real vLLM inference service on loopback, the training loop sampling
its rollouts there over gRPC (the trainer's identity) and reading the serving load with GetLoad, a
real PPO learner, and a load generator of user requests (the gateway's identity). While the users'
requests in flight reach the threshold the trainer sends no rollout and its status says "yielding to
users"; when the users leave it samples and trains again. The reward model is a stand-in scorer in
process (scoring is not what is under test; tests/integration/test_trainer_service.py drives the
real reward service).

The throughput figures printed at the end (rollouts/s, steps/min without and with users) are the
ones the report quotes."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.trainer.checkpoint import CheckpointStore
from services.trainer.learner import PPOLearner
from services.trainer.loop import LoopSettings, LoopState, TrainingLoop
from services.trainer.ppo_config import PPOConfig
from services.trainer.prompts import LivePromptBuffer, PromptMixer
from services.trainer.publishing import PolicyPublisher
from services.trainer.rollout_collector import GrpcPolicySampler, RolloutCollector
from services.trainer.user_load import GrpcLoadProbe, UserLoadGovernor, YieldSettings
from shared.events import Message
from shared.model_store import ModelStore
from shared.pb import common_pb2, inference_pb2, inference_pb2_grpc
from shared.version_line import POLICY, REWARD_MODEL, VersionLine
from tests.conftest import LoopThread, grpc_channel, start_inference, test_versions, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = 4
"""Concurrent users of the load generator: twice the threshold."""
THRESHOLD = 2
"""RLHF_TRAINER_YIELD_USER_IN_FLIGHT of the trainer under test (resumes at 1 user in flight or none)."""
PROMPTS = [(Message("user", f"What is {a} plus {b}?"),) for a in range(1, 9) for b in range(1, 5)]


@pytest.fixture(scope="module")
def inference(broker, policy_store, tmp_path_factory):
    loop = LoopThread()
    app = start_inference(
        loop,
        broker.kafka,
        policy_store.root,
        versions=test_versions(copies_dir=tmp_path_factory.mktemp("yield-copies")),
        follow_updates=False,
    )
    yield app
    loop.run(app.stop())
    loop.close()


@pytest.fixture(scope="module")
def learner_store(policy_store, tmp_path_factory):
    """The served policy under the same version name, and a reward model (random head) for the
    learner's value model, in a store of this module's own."""
    from transformers import AutoTokenizer

    from shared.models.reward_model import RewardModel

    root = tmp_path_factory.mktemp("yield-models")
    store = ModelStore(root / "store")
    src = root / "policy"
    shutil.copytree(policy_store.store.path(policy_store.first), src, ignore=shutil.ignore_patterns("manifest.*"))
    policy = VersionLine(store, POLICY).publish(src).version
    assert policy == policy_store.first
    with tempfile.TemporaryDirectory() as tmp:
        RewardModel.from_policy_dir(src, seed=0).save(Path(tmp), AutoTokenizer.from_pretrained(str(src)))
        VersionLine(store, REWARD_MODEL).publish(Path(tmp))
    return store


class LengthScorer:
    """A stand-in reward model: longer answers score higher."""

    def score(self, pairs):
        return [len(r) / 10.0 for _, r in pairs], "rm-0001"


class NoAnnouncer:
    def announce(self, event):
        raise AssertionError("nothing is published in this test")


class Users:
    """USERS threads chatting without pause through the inference service, as the gateway would."""

    def __init__(self, address: str):
        self.channel = grpc_channel(address, "gateway")
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.stop = threading.Event()
        self.answered = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._chat, args=(i,), daemon=True) for i in range(USERS)]

    def _chat(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            req = inference_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role="user", content=f"Tell me about the number {i * 100 + n}.")],
                sampling=inference_pb2.SamplingParams(max_tokens=48),
                source="user",
                principal=f"user-{i}",
            )
            try:
                self.stub.Generate(req, timeout=120)
                self.answered += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                return

    def __enter__(self) -> Users:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        self.channel.close()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def trainer_requests_entered(app) -> float:
    """Rollout requests the inference service took in: finished (ok or aborted) plus in flight."""
    finished = sum(sample("rlhf_inference_requests_total", source="trainer", outcome=o) for o in ("ok", "aborted"))
    return finished + app.serving.load.snapshot().trainer_in_flight


def test_the_trainer_pauses_rollouts_while_users_load_the_engine_and_resumes_after(inference, learner_store, tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    channel = grpc_channel(inference.address, "trainer")
    cfg = PPOConfig(epochs=1, minibatch_size=4, lr=1e-4, forward_batch_size=4)
    policy, rm = learner_store.current("policy"), learner_store.current("rm")
    state = LoopState(lineage=[policy], reference_version=policy, value_rm_version=rm)

    def load_learner(version, st):
        return PPOLearner.from_store(learner_store, version, st.reference_version, st.value_rm_version, cfg)

    settings = YieldSettings(
        user_in_flight=THRESHOLD, user_waiting=0, user_ttft_s=0.0, resume_fraction=0.5, poll_s=0.1, idle_budget=1.0
    )
    loop = TrainingLoop(
        load_learner(policy, state),
        state,
        PromptMixer(LivePromptBuffer(8), PROMPTS, 0.0),
        RolloutCollector(GrpcPolicySampler(channel, 120), LengthScorer(), max_tokens=16),
        PolicyPublisher(learner_store, NoAnnouncer(), LengthScorer(), PROMPTS[:2], max_tokens=8),
        CheckpointStore(tmp_path / "ckpt"),
        LoopSettings(
            rollouts_per_iteration=4,
            max_staleness_steps=64,
            publish_every=0,
            checkpoint_every=10_000,
            kl_bound=1e6,
            reward_tolerance=1e6,
            idle_sleep_s=0.2,
        ),
        load_learner,
        governor=UserLoadGovernor(settings, full=4),
        user_load=GrpcLoadProbe(channel).load,
    )
    loop.state.baseline = {"reward": 0.0, "rm_version": "rm-0001", "answers": []}  # no held-out evaluation
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    waited_before = sample("rlhf_trainer_user_wait_seconds_total", reason="users")
    thread.start()
    try:
        # No users: the trainer samples and trains (timed after its first step: warm).
        wait_until(lambda: loop.status().step >= 1, 300, "the trainer did not train without users")
        t0, step0 = time.monotonic(), loop.status().step
        wait_until(lambda: loop.status().step >= step0 + 3, 300, "the trainer did not train on")
        free = (loop.status().step - step0, time.monotonic() - t0)
        # full, or idle once the replica had no user for RLHF_TRAINER_IDLE_AFTER_S (budget 1 here: full speed)
        assert sum(sample("rlhf_trainer_user_load_state", state=s) for s in ("full", "idle")) == 1

        with Users(inference.address) as users:
            wait_until(lambda: loop.status().state == "yielding", 120, "the trainer did not yield to users")
            status = loop.status()
            # waiting before a group of rollouts, or holding the scoring / step of one already sampled
            assert status.detail.startswith(("yielding to users:", "scoring held: yielding", "learner step held"))
            # The rollouts in flight when it yielded finish; after that no new one is sent.
            wait_until(lambda: inference.serving.load.snapshot().trainer_in_flight == 0, 120, "rollouts still running")
            entered, step = trainer_requests_entered(inference), loop.status().step
            answered = users.answered
            time.sleep(8.0)
            assert trainer_requests_entered(inference) == entered, "a rollout was sent while users were over"
            assert loop.status().state == "yielding" and loop.status().step <= step + 1
            assert users.answered > answered and not users.errors
            load = inference.serving.load.snapshot()
            assert load.user_requests >= users.answered and load.trainer_in_flight == 0
        assert sample("rlhf_trainer_user_wait_seconds_total", reason="users") > waited_before + 7.0

        # The users left: rollouts resume and the trainer trains on.
        t1, step_after_users = time.monotonic(), loop.status().step
        wait_until(lambda: loop.status().step >= step_after_users + 2, 300, "the trainer did not resume")
        assert loop.status().state == "training"
        assert trainer_requests_entered(inference) > entered
        resumed = (loop.status().step - step_after_users, time.monotonic() - t1)
    finally:
        stop.set()
        thread.join(120)
        channel.close()
        torch.set_num_threads(threads)
    assert not thread.is_alive()
    print(
        f"\ntrainer throughput: without users {free[0] / free[1] * 60:.1f} steps/min "
        f"({free[0] * 4 / free[1]:.2f} rollouts/s); with {USERS} users over the threshold 0 steps/min "
        f"(yielding); after they left {resumed[0] / resumed[1] * 60:.1f} steps/min"
    )


def test_rollouts_still_running_when_users_need_the_capacity_are_cancelled_in_the_engine(inference):
    """A group of long rollouts is out; the interrupt (users' pressure reached the threshold) comes
    after the first poll: the sampler returns the completed prefix at once, and the inference service
    aborts the rest in vLLM, so nothing of the trainer's is left running on the engine."""
    channel = grpc_channel(inference.address, "trainer")
    sampler = GrpcPolicySampler(channel, timeout_s=120)
    asked: list[float] = []

    def users_arrive() -> bool:
        # Users arrive once every rollout of the group is running in the engine.
        asked.append(time.monotonic())
        return inference.serving.load.snapshot().trainer_in_flight >= len(prompts)

    MAX_TOKENS = 256  # the test service's limit: long enough to be running when the users come
    cancelled_before = sample("rlhf_trainer_rollouts_cancelled_total")
    aborted_before = sample("rlhf_inference_requests_total", source="trainer", outcome="aborted")
    prompts = [(Message("user", f"Count slowly from {i} to one thousand."),) for i in range(6)]
    started = time.monotonic()
    got = sampler.sample(prompts, max_tokens=MAX_TOKENS, top_p=1.0, seed=1, interrupt=users_arrive, poll_s=0.02)
    returned_after = time.monotonic() - started
    try:
        assert len(got) < len(prompts), "the long rollouts finished before the interrupt: nothing to cancel"
        assert [s.prompt for s in got] == prompts[: len(got)]  # a prefix, in order
        assert returned_after < 5.0
        cancelled = sample("rlhf_trainer_rollouts_cancelled_total") - cancelled_before
        assert cancelled == len(prompts) - len(got)
        wait_until(lambda: inference.serving.load.snapshot().trainer_in_flight == 0, 30, "rollouts still running")
        aborted = sample("rlhf_inference_requests_total", source="trainer", outcome="aborted") - aborted_before
        assert aborted >= 1  # freed in the engine, not left to run to MAX_TOKENS
    finally:
        channel.close()
