"""The reward servicer's rater RPCs: the conversions to the proto, the request checks, and a clear
error where the retraining loop does not run (over a real state, without the network; the
integration test test_reward_quarantine.py calls them over gRPC)."""

from __future__ import annotations

import asyncio
import math

import pytest

from services.reward.config import RewardConfig
from services.reward.domain import RaterRecord
from services.reward.raters import RaterScore
from services.reward.retraining import RetrainingLoop
from services.reward.retraining_state import RetrainingState
from services.reward.servicer import RewardServicer, rater_to_proto, raters_limit
from shared.config import ModelStoreConfig, load_config
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.model_store import ModelStore
from shared.pb import reward_pb2


def test_rater_to_proto_carries_every_field():
    msg = rater_to_proto(RaterRecord("mallory", "quarantined", "too contrary", 0.0, 16, math.nan, 0, 20, 5.0, 6.0))
    assert (msg.principal, msg.status, msg.reason) == ("mallory", "quarantined", "too contrary")
    assert (msg.peer_agreement, msg.peer_items, msg.rm_items, msg.comparisons) == (0.0, 16, 0, 20)
    assert math.isnan(msg.rm_agreement) and (msg.updated_at, msg.status_at) == (5.0, 6.0)


@pytest.mark.parametrize("limit, expected", [(0, 100), (1, 1), (1000, 1000)])
def test_raters_limit(limit, expected):
    assert raters_limit(limit) == expected


@pytest.mark.parametrize("limit", [-1, 1001])
def test_raters_limit_out_of_range_names_the_field(limit):
    with pytest.raises(InvalidArgument) as err:
        raters_limit(limit)
    assert err.value.param == "limit"


@pytest.fixture()
def servicer(tmp_path):
    cfg = load_config(RewardConfig, {}, model_store=ModelStoreConfig(tmp_path / "models"), state_dir=tmp_path)
    state = RetrainingState(tmp_path / "learner.sqlite3")
    loop = RetrainingLoop(cfg, ModelStore(tmp_path / "models"), state)
    state.update_raters(
        {"alice": (RaterScore(0.9, 30, math.nan, 0), 40), "mallory": (RaterScore(0.0, 30, 0.1, 25), 40)}, 1.0
    )
    state.quarantine("mallory", "contrary", 2.0)
    yield RewardServicer(scorer=None, learner=lambda: loop)  # type: ignore[arg-type]  # no Score here
    state.close()


def call(method, request):
    return asyncio.run(method(request, None))


def test_list_and_release_through_the_servicer(servicer):
    listed = call(servicer.ListRaters, reward_pb2.ListRatersRequest())
    assert [r.principal for r in listed.raters] == ["mallory", "alice"]  # quarantined first
    assert (listed.total, listed.quarantined) == (2, 1)
    only = call(servicer.ListRaters, reward_pb2.ListRatersRequest(quarantined_only=True, limit=5))
    assert [r.principal for r in only.raters] == ["mallory"]
    released = call(servicer.ReleaseRater, reward_pb2.ReleaseRaterRequest(principal="mallory"))
    assert released.status == "released" and released.principal == "mallory"
    assert call(servicer.ListRaters, reward_pb2.ListRatersRequest()).quarantined == 0


def test_release_refuses_nothing_unknown_and_not_quarantined(servicer):
    with pytest.raises(InvalidArgument, match="principal"):
        call(servicer.ReleaseRater, reward_pb2.ReleaseRaterRequest())
    with pytest.raises(NotFound, match="nobody"):
        call(servicer.ReleaseRater, reward_pb2.ReleaseRaterRequest(principal="nobody"))
    with pytest.raises(FailedPrecondition, match="not quarantined"):
        call(servicer.ReleaseRater, reward_pb2.ReleaseRaterRequest(principal="alice"))


def test_a_replica_without_the_retraining_loop_says_so():
    servicer = RewardServicer(scorer=None)  # type: ignore[arg-type]
    with pytest.raises(FailedPrecondition, match="RLHF_REWARD_LEARNER"):
        call(servicer.ListRaters, reward_pb2.ListRatersRequest())
