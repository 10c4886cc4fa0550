"""The reward service end to end: the first RM trained offline from the shipped rankings file on the
default policy, then scored over real gRPC on loopback (batching, version, bad input, health)."""

from __future__ import annotations

import random
import shutil
import statistics
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.reward.offline import EXAMPLE_RANKINGS, OFFLINE_SETTINGS, train_first_rm
from shared.config import ModelStoreConfig, load_config
from shared.errors import PARAM_METADATA_KEY
from shared.model_store import ModelStore
from shared.pb import common_pb2, reward_pb2, reward_pb2_grpc
from tests.conftest import LoopThread, grpc_channel, test_auth

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVASIVE = ["I do not know the answer to that.", "I am not sure, sorry.", "Could you ask me something else?"]


@pytest.fixture(scope="module")
def rm_store(policy_store, tmp_path_factory):
    """A store of our own (never the shared session store): a copy of policy-0001, then rm-0001."""
    store = ModelStore(tmp_path_factory.mktemp("reward-models"))
    copy = tmp_path_factory.mktemp("policy-copy") / "policy"
    shutil.copytree(policy_store.store.path(policy_store.first), copy, ignore=shutil.ignore_patterns("manifest.*"))
    store.publish("policy", copy, extra={"copied_from": policy_store.first})
    result = train_first_rm(store, EXAMPLE_RANKINGS, epochs=5, settings=OFFLINE_SETTINGS)
    return store, result


@pytest.fixture(scope="module")
def reward_app(rm_store):
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    store, _ = rm_store
    cfg = load_config(
        RewardConfig,
        {},
        grpc_port=0,
        metrics_port=0,
        model_store=ModelStoreConfig(root=store.root),
        max_items=64,
        max_batch_size=16,
        max_response_chars=2000,
        auth=test_auth(),
    )
    loop = LoopThread()

    async def make():
        app = RewardApp(cfg)
        await app.start()
        return app

    app = loop.run(make(), timeout=120)
    yield app
    loop.run(app.stop())
    loop.close()


@pytest.fixture()
def stub(reward_app):
    with grpc_channel(reward_app.address, "trainer") as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel), channel


def item(question: str, response: str) -> reward_pb2.ScoreItem:
    return reward_pb2.ScoreItem(messages=[common_pb2.ChatMessage(role="user", content=question)], response=response)


def test_offline_training_beats_chance_on_held_out_rankings(rm_store):
    store, result = rm_store
    m = result.metrics
    assert result.version == "rm-0001" and store.current("rm") == "rm-0001"
    assert store.manifest("rm-0001").parent == "policy-0001"
    # Chance is 0.5 per pair; the untrained head is at chance or worse.
    assert m["heldout_accuracy"] >= 0.7, m
    assert m["heldout_accuracy"] > m["heldout_accuracy_before"], m


def test_score_a_batch_of_40_over_grpc(stub):
    stub, _ = stub
    rng = random.Random(5)
    items, kinds = [], []
    for _ in range(20):  # prompts the RM has not seen
        a, b = rng.randint(100, 400), rng.randint(100, 400)
        q = f"What is {a} plus {b}?"
        items += [item(q, f"{a} plus {b} is {a + b}."), item(q, rng.choice(EVASIVE))]
        kinds += ["answer", "non-answer"]
    before = REGISTRY.get_sample_value("rlhf_reward_scored_items_total") or 0.0
    resp = stub.Score(reward_pb2.ScoreRequest(items=items), timeout=60)
    assert len(resp.scores) == 40 and resp.rm_version == "rm-0001"
    assert list(resp.truncated) == [False] * 40
    answers = [s for s, k in zip(resp.scores, kinds) if k == "answer"]
    non_answers = [s for s, k in zip(resp.scores, kinds) if k == "non-answer"]
    # The example file ranks a (correct) sum above an evasive reply: the learnt preference.
    assert statistics.mean(answers) > statistics.mean(non_answers) + 1.0, (answers, non_answers)
    assert REGISTRY.get_sample_value("rlhf_reward_scored_items_total") - before == 40


def test_concurrent_requests_get_the_scores_they_would_get_alone(stub):
    stub, _ = stub
    requests = [
        [item(f"What is {a} plus {a}?", f"{a} plus {a} is {2 * a}."), item("Hello?", EVASIVE[a % 3])]
        for a in range(1, 7)
    ]
    alone = [list(stub.Score(reward_pb2.ScoreRequest(items=r), timeout=30).scores) for r in requests]
    with ThreadPoolExecutor(6) as pool:
        together = list(
            pool.map(lambda r: list(stub.Score(reward_pb2.ScoreRequest(items=r), timeout=30).scores), requests)
        )
    assert together == [pytest.approx(a, abs=1e-5) for a in alone]


@pytest.mark.parametrize(
    "request_items, param, words",
    [
        ([], "items", "items must not be empty"),
        ([item("What is 1 plus 1?", "x" * 2001)], "items[0].response", "longer than 2000 characters"),
        ([item("What is 1 plus 1?", "2"), item("What is 1 plus 1?", "")], "items[1].response", "must not be empty"),
        ([item("What is 1 plus 1?", "2")] * 65, "items", "at most 64 items"),
    ],
)
def test_empty_or_oversized_requests_are_invalid_argument(stub, request_items, param, words):
    stub, _ = stub
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(reward_pb2.ScoreRequest(items=request_items), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()
    assert (PARAM_METADATA_KEY, param) in tuple(err.value.trailing_metadata())


def test_health_serving_and_reward_model_info(stub):
    stub, channel = stub
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "rlhf.v1.RewardService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    info = stub.GetRewardModel(reward_pb2.GetRewardModelRequest(), timeout=10)
    assert info.version == "rm-0001" and info.parent == "policy-0001"
    assert info.metrics["heldout_accuracy"] >= 0.7 and info.published_at > 0
