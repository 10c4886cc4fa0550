"""The reward service's continual learner end to end, with real parts: its own embedded broker (the
learner reads rlhf.feedback from the beginning, so other tests' ratings must not leak in), the
feedback service over gRPC, the reward service over gRPC with the learner thread, the model store.

Completions are put on rlhf.completions by this test playing the inference service's part (and it
signs the feedback tokens as the gateway would): the default policy's weights are random, so only
hand-written responses carry a preference worth learning. Everything downstream is the product:
SubmitFeedback -> rlhf.feedback -> learner (SQLite join) -> round -> gate -> rm-NNNN -> scorer swap
and an announcement on rlhf.reward-models.

The task: answers to "What is a plus b?" that end with a friendly line vs the same answer without
it. The direction is the one the offline rm-0001 gets wrong on the held-out prompts (checked
below), so a new version can only beat it by learning from the live rankings.
"""

from __future__ import annotations

import shutil
import statistics
import threading
import time

import pytest
from prometheus_client import REGISTRY

from services.reward.offline import EXAMPLE_RANKINGS, OFFLINE_SETTINGS, train_first_rm
from services.reward.retraining import is_heldout
from shared.config import ModelStoreConfig, load_config
from shared.events import CompletionEvent, Message, RewardModelEvent, Timings
from shared.feedback_token import TokenClaims, prompt_hash, sign
from shared.kafka.publishers import KafkaPublisher, Outbox
from shared.kafka.topics import COMPLETIONS, REWARD_MODELS
from shared.model_store import ModelStore
from shared.pb import common_pb2, feedback_pb2, feedback_pb2_grpc, reward_pb2, reward_pb2_grpc
from shared.version_line import POLICY, REWARD_MODEL, PendingAnnouncement, VersionLine
from tests.conftest import (
    TEST_TOKEN_SECRET,
    LoopThread,
    consume_events,
    grpc_channel,
    start_broker,
    start_feedback,
    test_auth,
    test_signing_key,
    test_versions,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HELDOUT_FRACTION = 0.25
SUFFIX = " Happy to help!"


def question(a: int) -> str:
    return f"What is {a} plus {a % 7 + 2}?"


def answer(a: int) -> str:
    return f"{a} plus {a % 7 + 2} is {a + a % 7 + 2}."


def split_prompts(n_held: int, n_train: int, start: int) -> tuple[list[int], list[int]]:
    held, train, a = [], [], start
    while len(held) < n_held or len(train) < n_train:
        side = held if is_heldout(prompt_hash([("user", question(a))]), HELDOUT_FRACTION) else train
        if len(side) < (n_held if side is held else n_train):
            side.append(a)
        a += 1
    return held, train


class World:
    """Broker, feedback service, reward service (restartable) and the task's helpers."""

    def __init__(self, tmp_path_factory, policy_store):
        self.broker = start_broker()
        self.loop = LoopThread()
        self.feedback = start_feedback(self.loop, self.broker.kafka)
        self.store = ModelStore(tmp_path_factory.mktemp("learner-models"))
        copy = tmp_path_factory.mktemp("learner-policy") / "policy"
        shutil.copytree(policy_store.store.path(policy_store.first), copy, ignore=shutil.ignore_patterns("manifest*"))
        VersionLine(self.store, POLICY, signer=test_signing_key()).publish(copy)
        train_first_rm(self.store, EXAMPLE_RANKINGS, epochs=3, settings=OFFLINE_SETTINGS, signer=test_signing_key("rm"))
        self.copies_dir = tmp_path_factory.mktemp("learner-copies")
        self.state_dir = tmp_path_factory.mktemp("learner-state")
        self.inference = Outbox(KafkaPublisher(self.broker.kafka, "inference"))
        self.channel = grpc_channel(self.feedback.address, "gateway")
        self.feedback_stub = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self.reward = None
        self.preferred_first = True  # set by the first test: which response users prefer

    def start_reward(self, **overrides):
        from services.reward.app import RewardApp
        from services.reward.config import RewardConfig

        values = dict(
            grpc_port=0,
            metrics_port=0,
            kafka=self.broker.kafka,
            state_dir=self.state_dir,
            model_store=ModelStoreConfig(root=self.store.root),
            learn_every_comparisons=24,
            learn_every_s=3600,
            heldout_fraction=HELDOUT_FRACTION,
            learner_epochs=4,
            learner_lr=1e-3,
            gate_tolerance=0.02,
            torch_threads=1,
            # One rater at a time teaches the RM here (and mallory, alone on her prompts, tests the gate):
            # no cap per principal, no quarantine. Their own test is test_reward_quarantine.py.
            max_principal_share=1.0,
            quarantine_below=0.0,
            auth=test_auth(),
            versions=test_versions(copies_dir=self.copies_dir),
        )
        values.update(overrides)
        cfg = load_config(RewardConfig, {}, **values)

        async def make():
            app = RewardApp(cfg)
            await app.start()
            return app

        self.reward = self.loop.run(make(), timeout=120)
        return self.reward

    def stop_reward(self):
        self.loop.run(self.reward.stop(), timeout=120)
        self.reward = None

    def close(self):
        if self.reward is not None:
            self.stop_reward()
        self.channel.close()
        self.inference.close()
        self.loop.run(self.feedback.stop())
        self.loop.close()
        self.broker.broker.stop()

    # --- the task ---------------------------------------------------------------------------------

    def serve(self, a: int, tag: str) -> tuple[str, str]:
        """Put the two completions for prompt ``a`` on rlhf.completions; (id with suffix, id without)."""
        ids = (f"{tag}-{a}-friendly", f"{tag}-{a}-plain")
        for rid, text in zip(ids, (answer(a) + SUFFIX, answer(a))):
            self.inference.publish(
                COMPLETIONS,
                CompletionEvent(
                    request_id=f"req-{rid}",
                    response_id=rid,
                    index=0,
                    n=1,
                    policy_version="policy-0001",
                    model="rlhf-policy",
                    source="user",
                    messages=[Message("user", question(a))],
                    prompt_token_ids=[],
                    completion_text=text,
                    token_ids=[],
                    logprobs=None,
                    finish_reason="stop",
                    sampling={},
                    timings=Timings(0, 0, 0),
                    created_at=time.time(),
                ),
                key=f"req-{rid}",
            )
        return ids

    def rank(self, a: int, ids: tuple[str, str], user: str, reverse: bool = False) -> None:
        """Submit one ranking through the feedback service, the users' preferred response first."""
        first_is_preferred = self.preferred_first != reverse
        order = list(ids) if first_is_preferred else list(reversed(ids))
        ph = prompt_hash([("user", question(a))])
        exp = int(time.time()) + 3600
        tokens = [sign(TEST_TOKEN_SECRET, TokenClaims(rid, "policy-0001", ph, exp, principal=user)) for rid in ids]
        resp = self.feedback_stub.SubmitFeedback(
            feedback_pb2.SubmitFeedbackRequest(
                ranking=feedback_pb2.Ranking(response_ids=order), feedback_tokens=tokens, principal=user
            ),
            timeout=30,
        )
        assert resp.revision == 1 and not resp.duplicate

    def rate(self, prompts: list[int], tag: str, user: str, reverse: bool = False) -> None:
        served = {a: self.serve(a, tag) for a in prompts}
        assert self.inference.flush(30), "completions not acknowledged"
        for a, ids in served.items():
            self.rank(a, ids, user, reverse)

    def reward_stub(self):
        return reward_pb2_grpc.RewardServiceStub(grpc_channel(self.reward.address, "trainer"))


def score_items(prompts, text):
    return [
        reward_pb2.ScoreItem(messages=[common_pb2.ChatMessage(role="user", content=question(a))], response=text(a))
        for a in prompts
    ]


class ScoreLoad:
    """Threads calling Score over gRPC without pause, recording every version and every failure."""

    def __init__(self, address: str, threads: int = 2):
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(address,), daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, address: str) -> None:
        items = score_items(range(1, 9), answer)
        with grpc_channel(address, "trainer") as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            while not self._stop.is_set():
                try:
                    resp = stub.Score(reward_pb2.ScoreRequest(items=items), timeout=30)
                    assert len(resp.scores) == len(items)
                    self.versions.append(resp.rm_version)
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    self.failures.append(repr(exc))
                time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


@pytest.fixture(scope="module")
def world(tmp_path_factory, policy_store):
    w = World(tmp_path_factory, policy_store)
    w.start_reward()
    yield w
    w.close()


def rm_prefers_friendly(world, prompts) -> float:
    """Fraction of ``prompts`` on which the serving RM scores the friendly answer above the plain one."""
    stub = world.reward_stub()
    friendly = stub.Score(
        reward_pb2.ScoreRequest(items=score_items(prompts, lambda a: answer(a) + SUFFIX)), timeout=60
    ).scores
    plain = stub.Score(reward_pb2.ScoreRequest(items=score_items(prompts, answer)), timeout=60).scores
    return statistics.mean(float(f > p) for f, p in zip(friendly, plain))


HELD, TRAIN = split_prompts(n_held=12, n_train=24 + 24 + 48, start=100)


def test_rankings_through_feedback_give_a_better_rm_and_the_scorer_swaps_under_load(world):
    assert world.reward.scorer.version == "rm-0001"
    # Users prefer whichever of the two the offline RM ranks lower on the held-out prompts.
    world.preferred_first = rm_prefers_friendly(world, HELD) <= 0.5
    load = ScoreLoad(world.reward.address)
    try:
        world.rate(HELD, "held", "alice")  # the held-out slice first: the gate needs it in the state
        wait_until(lambda: world.reward.learner.state.counts()["votes"] == len(HELD), 30, "held-out votes stored")
        world.rate(TRAIN[:24], "a", "alice")
        wait_until(lambda: "rm-0002" in world.store.versions("rm"), 180, "no rm-0002 published")
        wait_until(lambda: world.reward.scorer.version == "rm-0002", 30, "scorer did not swap")
        time.sleep(0.5)  # a few more calls on the new version
    finally:
        load.stop()
    m = world.store.verify("rm-0002").metrics
    assert world.store.manifest("rm-0002").parent == "rm-0001"
    # The gate measured both on the same held-out comparisons: the new version beats the previous one.
    assert m["heldout_pairs"] == len(HELD) and m["new_comparisons"] == 24
    assert m["heldout_accuracy"] > m["heldout_accuracy_before"] and m["heldout_accuracy"] >= 0.75, m
    learnt = rm_prefers_friendly(world, HELD)
    assert (learnt if world.preferred_first else 1 - learnt) >= 0.75
    # Scoring never failed while the versions swapped, and calls saw both versions.
    assert load.failures == [] and {"rm-0001", "rm-0002"} <= set(load.versions), (load.failures[:3], set(load.versions))
    # The learner's metrics: every new comparison timed from its rating to rm-0002, nothing left unread.
    assert REGISTRY.get_sample_value("rlhf_reward_learner_rating_to_rm_seconds_count") >= 24
    assert REGISTRY.get_sample_value("rlhf_reward_learner_heldout_accuracy", {"model": "current"}) == pytest.approx(
        m["heldout_accuracy"]
    )
    wait_until(
        lambda: REGISTRY.get_sample_value("rlhf_reward_learner_consumer_lag", {"topic": "rlhf.feedback"}) == 0,
        10,
        "learner lag on rlhf.feedback",
    )
    [announced] = consume_events(
        world.broker.kafka,
        REWARD_MODELS,
        lambda e: isinstance(e.payload, RewardModelEvent) and e.payload.version == "rm-0002",
        1,
    )
    assert announced.payload.manifest_sha256 == world.store.manifest_sha256("rm-0002")


def test_a_restarted_learner_loses_no_comparison(world):
    trained_before = len(world.reward.learner.state.trained_keys())
    world.stop_reward()
    # Ratings given while the learner is down wait on the topics.
    world.rate(TRAIN[24:48], "b", "bob")
    # From here a round replays a quarter as many older comparisons as it has new ones.
    world.start_reward(replay_ratio=0.25)
    wait_until(
        lambda: any(r.version == "rm-0003" for r in world.reward.learner.rounds), 180, "no rm-0003 after the restart"
    )
    m = world.store.verify("rm-0003").metrics
    # Exactly the 24 new ones are new (nothing replayed from the topics twice), all 48 are trained.
    assert m["new_comparisons"] == 24 and m["trained_comparisons_total"] == trained_before + 24 == 48, m
    counts = world.reward.learner.state.counts()
    assert counts["votes"] == len(HELD) + 48 and counts["dropped_votes"] == 0


def test_a_degraded_candidate_is_not_published(world):
    # A rater who ranks every pair the wrong way round, on training prompts only: the candidate learns
    # the reversed preference and its held-out accuracy falls, so the gate keeps rm-0003.
    before = len(world.reward.learner.rounds)
    world.rate(TRAIN[48:96], "c", "mallory", reverse=True)
    wait_until(lambda: len(world.reward.learner.rounds) > before, 180, "no round ran")
    result = world.reward.learner.rounds[before]
    assert result.outcome == "refused" and result.candidate_accuracy < result.current_accuracy - 0.02, result
    assert world.store.versions("rm") == ["rm-0001", "rm-0002", "rm-0003"] and world.store.current("rm") == "rm-0003"
    assert world.reward.scorer.version == "rm-0003"


class UnreachableKafka:
    """The announcer of a process that dies before it announces: never reached."""

    def announce(self, event):
        raise AssertionError("the crashed process announced after all")


def test_a_version_published_but_never_announced_is_announced_on_restart(world, tmp_path):
    # What a reward service killed between publishing an rm version and announcing it leaves behind:
    # the version current in the store, the rm line's last acknowledged announcement the one before.
    world.stop_reward()
    src = tmp_path / "rm"
    shutil.copytree(world.store.path("rm-0003"), src, ignore=shutil.ignore_patterns("manifest*"))
    VersionLine(world.store, REWARD_MODEL, UnreachableKafka(), signer=test_signing_key("rm")).publish(
        src, parent="rm-0003"
    )
    assert VersionLine(world.store, REWARD_MODEL).pending_announcement() == PendingAnnouncement("rm-0004", "publish")
    world.start_reward()
    [announced] = consume_events(
        world.broker.kafka,
        REWARD_MODELS,
        lambda e: isinstance(e.payload, RewardModelEvent) and e.payload.version == "rm-0004",
        1,
    )
    assert announced.payload.manifest_sha256 == world.store.manifest_sha256("rm-0004")
    assert announced.payload.parent == "rm-0003" and announced.payload.reason == "publish"
    assert VersionLine(world.store, REWARD_MODEL).pending_announcement() is None
    # The restarted scorer started from the last signed announcement (rm-0003) and swaps when the
    # owed one arrives (shared/version_line.py, "Restarts").
    wait_until(lambda: world.reward.scorer.version == "rm-0004", 30, "the owed version was not swapped in")
