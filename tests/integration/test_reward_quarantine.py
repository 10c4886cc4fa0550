"""No one stuffs the ballot, through the real stack: three honest raters and one who always ranks in
reverse rate the same answers through the feedback service (gRPC, signed tokens bound to each
principal), the ratings go over the broker to the reward service's retraining loop, and the loop
quarantines the reverse rater before it trains. The RM it then publishes is compared with RMs the
test trains itself from the same state, without and with that rater.

This test plays the inference service's part (it puts the completions on rlhf.completions and signs
the feedback tokens as the gateway would), as test_reward_live_learning.py does. Each principal is
served its own completions (its own response ids: a token binds a response to the principal it was
served to); the answers' texts are the same, which is what the raters' agreement is measured on.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from flywheel.cli import main as rlhf
from services.reward.comparisons import ComparisonGroup, TrainingExamples
from services.reward.offline import EXAMPLE_RANKINGS, OFFLINE_SETTINGS, train_first_rm
from services.reward.retraining import RetrainingLoop, is_heldout
from services.reward.retraining_state import RetrainingState
from services.reward.training import RewardTrainer
from shared.config import ModelStoreConfig, load_config
from shared.events import CompletionEvent, Message, Timings
from shared.feedback_token import TokenClaims, prompt_hash, sign
from shared.kafka.publishers import KafkaPublisher, Outbox
from shared.kafka.topics import COMPLETIONS
from shared.model_store import ModelStore
from shared.models.reward_model import load_version
from shared.pb import common_pb2, feedback_pb2, feedback_pb2_grpc, reward_pb2, reward_pb2_grpc
from shared.version_line import POLICY, VersionLine
from tests.conftest import (
    TEST_CALLER_TOKENS,
    TEST_TOKEN_SECRET,
    LoopThread,
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
HONEST = ("alice", "bob", "carol")
REVERSE = "mallory"
MIN_ITEMS = 10


def question(a: int) -> str:
    return f"What is {a} plus {a % 7 + 2}?"


def answer(a: int) -> str:
    return f"{a} plus {a % 7 + 2} is {a + a % 7 + 2}."


def split_prompts(n_held: int, n_train: int, start: int) -> tuple[list[int], list[int]]:
    held: list[int] = []
    train: list[int] = []
    a = start
    while len(held) < n_held or len(train) < n_train:
        side, n = (
            (held, n_held) if is_heldout(prompt_hash([("user", question(a))]), HELDOUT_FRACTION) else (train, n_train)
        )
        if len(side) < n:
            side.append(a)
        a += 1
    return held, train


HELD, TRAIN = split_prompts(n_held=8, n_train=16, start=300)


class World:
    """Broker, feedback service, reward service with its retraining loop (restartable), model store."""

    def __init__(self, tmp_path_factory, policy_store):
        self.broker = start_broker()  # its own: the loop reads rlhf.feedback from the beginning
        self.loop = LoopThread()
        self.feedback = start_feedback(self.loop, self.broker.kafka)
        self.store = ModelStore(tmp_path_factory.mktemp("quarantine-models"))
        copy = tmp_path_factory.mktemp("quarantine-policy") / "policy"
        shutil.copytree(policy_store.store.path(policy_store.first), copy, ignore=shutil.ignore_patterns("manifest*"))
        VersionLine(self.store, POLICY, signer=test_signing_key()).publish(copy)
        train_first_rm(self.store, EXAMPLE_RANKINGS, epochs=3, settings=OFFLINE_SETTINGS, signer=test_signing_key("rm"))
        self.state_dir = tmp_path_factory.mktemp("quarantine-state")
        self.copies_dir = tmp_path_factory.mktemp("quarantine-copies")
        self.inference = Outbox(KafkaPublisher(self.broker.kafka, "inference"))
        self.feedback_channel = grpc_channel(self.feedback.address, "gateway")
        self.feedback_stub = feedback_pb2_grpc.FeedbackServiceStub(self.feedback_channel)
        self.reward = None
        self.cfg = None
        self.preferred_first = True

    def start_reward(self):
        from services.reward.app import RewardApp
        from services.reward.config import RewardConfig

        self.cfg = load_config(
            RewardConfig,
            {},
            grpc_port=0,
            metrics_port=0,
            kafka=self.broker.kafka,
            state_dir=self.state_dir,
            model_store=ModelStoreConfig(root=self.store.root),
            auth=test_auth(),
            versions=test_versions(copies_dir=self.copies_dir),
            learn_every_comparisons=len(TRAIN) * 4,  # one round, once every training rating is in
            learn_every_s=3600,
            heldout_fraction=HELDOUT_FRACTION,
            learner_epochs=4,
            learner_lr=1e-3,
            gate_tolerance=0.02,
            torch_threads=1,
            max_principal_share=0.1,
            min_principal_cap=32,  # four principals of 16 each: the floor admits all (caps: tests/unit)
            quarantine_below=0.4,
            quarantine_min_items=MIN_ITEMS,
        )

        async def make():
            app = RewardApp(self.cfg)
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
        self.feedback_channel.close()
        self.inference.close()
        self.loop.run(self.feedback.stop())
        self.loop.close()
        self.broker.broker.stop()

    def serve(self, a: int, user: str) -> tuple[str, str]:
        """Put the two completions ``user`` was served for prompt ``a`` on rlhf.completions;
        (id of the friendly answer, id of the plain one)."""
        ids = (f"{user}-{a}-friendly", f"{user}-{a}-plain")
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
                    principal=user,
                ),
                key=f"req-{rid}",
            )
        return ids

    def rank(self, a: int, ids: tuple[str, str], user: str) -> None:
        """``user`` ranks its two completions through the feedback service, as the gateway forwards it."""
        first_is_preferred = self.preferred_first != (user == REVERSE)
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

    def rate_everything(self) -> None:
        users = (*HONEST, REVERSE)
        served = {(a, u): self.serve(a, u) for a in HELD + TRAIN for u in users}
        assert self.inference.flush(30), "completions not acknowledged"
        for a in HELD + TRAIN:  # the held-out slice first, then every training prompt, four raters each
            for u in users:
                self.rank(a, served[(a, u)], u)

    def stub(self, caller: str) -> reward_pb2_grpc.RewardServiceStub:
        return reward_pb2_grpc.RewardServiceStub(grpc_channel(self.reward.address, caller))


def rm_prefers_friendly(world: World, prompts: list[int]) -> float:
    stub = world.stub("trainer")

    def items(text):
        return [
            reward_pb2.ScoreItem(messages=[common_pb2.ChatMessage(role="user", content=question(a))], response=text(a))
            for a in prompts
        ]

    friendly = stub.Score(reward_pb2.ScoreRequest(items=items(lambda a: answer(a) + SUFFIX)), timeout=60).scores
    plain = stub.Score(reward_pb2.ScoreRequest(items=items(answer)), timeout=60).scores
    return statistics.mean(float(f > p) for f, p in zip(friendly, plain))


@pytest.fixture(scope="module")
def world(tmp_path_factory, policy_store):
    w = World(tmp_path_factory, policy_store)
    w.start_reward()
    yield w
    w.close()


def test_the_reverse_rater_is_quarantined_before_the_round_and_the_rm_is_no_worse_for_it(world, capsys):
    # The honest raters prefer whichever answer rm-0001 ranks lower on the held-out prompts: only
    # learning from them can make a better RM, and the reverse rater agrees with rm-0001 (so only its
    # peers can tell it apart: the reason the peers judge first).
    world.preferred_first = rm_prefers_friendly(world, HELD) <= 0.5
    world.rate_everything()
    wait_until(lambda: world.reward.learner.rounds, 300, "no training round ran")
    result = world.reward.learner.rounds[0]

    # Judged before training: agreement 0 with its peers on all 24 items it shares with them.
    operator = world.stub("operator")
    listed = operator.ListRaters(reward_pb2.ListRatersRequest(), timeout=30)
    by_name = {r.principal: r for r in listed.raters}
    mallory = by_name[REVERSE]
    assert mallory.status == "quarantined" and "other raters" in mallory.reason
    assert mallory.peer_agreement == 0.0 and mallory.peer_items == len(HELD + TRAIN) >= MIN_ITEMS
    for name in HONEST:
        assert by_name[name].status == "ok" and by_name[name].peer_agreement == pytest.approx(2 / 3)
    assert (listed.total, listed.quarantined) == (4, 1)
    assert dict(listed.held_back)["quarantined"] == len(TRAIN) and dict(listed.held_back)["heldout_quarantined"] == len(
        HELD
    )
    quarantined_only = operator.ListRaters(reward_pb2.ListRatersRequest(quarantined_only=True), timeout=30)
    assert [r.principal for r in quarantined_only.raters] == [REVERSE]
    assert REGISTRY.get_sample_value("rlhf_reward_learner_raters", {"status": "quarantined"}) == 1
    assert REGISTRY.get_sample_value("rlhf_reward_learner_quarantines_total", {"judge": "peers"}) >= 1

    # The round trained on the honest raters only, and was judged on their held-out comparisons only.
    assert REVERSE not in result.new_by_principal and REVERSE not in result.heldout_by_principal
    assert result.new_by_principal == {name: len(TRAIN) for name in HONEST}
    assert result.outcome == "published" and result.version == "rm-0002", result
    m = world.store.verify("rm-0002").metrics
    assert m["quarantined_comparisons"] == len(TRAIN) and m["heldout_pairs"] == 3 * len(HELD)

    # The comparison the brief asks for: RMs trained here, from the same state and the same start
    # (rm-0001) with the loop's settings, without the reverse rater and with it, all measured on the
    # honest raters' held-out comparisons.
    world.stop_reward()
    state = RetrainingState(world.state_dir / "learner.sqlite3")
    try:
        loop = RetrainingLoop(world.cfg, world.store, state)
        comps = loop.comparisons()
        heldout = [
            c.example for c in comps.heldout if c.principal != REVERSE and isinstance(c.example, ComparisonGroup)
        ]
        ordered = sorted(comps.train, key=lambda c: c.order)

        def measure(version: str, train_on=None) -> tuple[float, float]:
            """(held-out pairwise accuracy, mean held-out group loss) of ``version``, trained further
            on ``train_on`` first when given."""
            loaded = load_version(world.store, version)
            trainer = RewardTrainer(loaded.model, loaded.tokenizer, loop.settings)
            if train_on is not None:
                trainer.fit(TrainingExamples(groups=[c.example for c in train_on]))
            return trainer.evaluate(heldout)

        rms = {
            "rm-0001 (before)": measure("rm-0001"),
            "rm-0002 (published, reverse rater quarantined)": measure("rm-0002"),
            "trained here without the reverse rater": measure(
                "rm-0001", [c for c in ordered if c.principal != REVERSE]
            ),
            "trained here with the reverse rater": measure("rm-0001", ordered),
        }
    finally:
        state.close()
    with capsys.disabled():
        print(f"\non the honest raters' {3 * len(HELD)} held-out comparisons: accuracy, mean loss")
        for name, (acc, loss) in rms.items():
            print(f"  {name}: {acc:.3f}, {loss:.3g}")
    published, without, with_it = (
        rms["rm-0002 (published, reverse rater quarantined)"],
        rms["trained here without the reverse rater"],
        rms["trained here with the reverse rater"],
    )
    one_pair = 1 / (3 * len(HELD))
    assert published[0] >= without[0] - one_pair and published[0] > rms["rm-0001 (before)"][0], rms
    assert published[1] == pytest.approx(without[1], rel=0.05, abs=1e-3), rms  # the same data, the same settings
    # With the reverse rater's pairs the RM is less sure of the honest preference (higher held-out loss).
    assert published[0] >= with_it[0] and published[1] < with_it[1], rms
    assert not math.isnan(published[0])


def test_quarantine_survives_a_restart_and_an_operator_releases(world, monkeypatch, capsys):
    if world.reward is None:
        world.start_reward()
    operator = world.stub("operator")
    listed = operator.ListRaters(reward_pb2.ListRatersRequest(quarantined_only=True), timeout=30)
    assert [r.principal for r in listed.raters] == [REVERSE]  # from SQLite, across the restart

    # The operator's shell: `rlhf raters list`, with the operator credential, and without it.
    monkeypatch.setenv("RLHF_OPERATOR_TOKEN", TEST_CALLER_TOKENS["operator"])
    assert rlhf(["raters", "list", "--quarantined", "--address", world.reward.address]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [r["principal"] for r in shown["raters"]] == [REVERSE] and shown["quarantined"] == "1"
    monkeypatch.setenv("RLHF_OPERATOR_TOKEN", TEST_CALLER_TOKENS["gateway"])  # a caller that may not list
    assert rlhf(["raters", "list", "--address", world.reward.address]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err

    # Refusals name the problem.
    for request, code in (
        (reward_pb2.ReleaseRaterRequest(principal="nobody"), grpc.StatusCode.NOT_FOUND),
        (reward_pb2.ReleaseRaterRequest(principal="alice"), grpc.StatusCode.FAILED_PRECONDITION),
        (reward_pb2.ReleaseRaterRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as err:
            operator.ReleaseRater(request, timeout=30)
        assert err.value.code() == code, err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        operator.ListRaters(reward_pb2.ListRatersRequest(limit=5000), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in err.value.details()

    released = operator.ReleaseRater(reward_pb2.ReleaseRaterRequest(principal=REVERSE), timeout=30)
    assert released.status == "released" and released.status_at > 0
    after = operator.ListRaters(reward_pb2.ListRatersRequest(), timeout=30)
    assert after.quarantined == 0 and {r.principal: r.status for r in after.raters}[REVERSE] == "released"
    # Her comparisons are admitted again (the next round, when one is due, trains on them).
    loop = world.reward.learner
    assert sum(1 for c in loop.select(loop.comparisons()).new if c.principal == REVERSE) == len(TRAIN)
