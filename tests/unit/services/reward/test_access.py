"""Every RPC of the reward service has a decision on who may call it, made of known callers."""

from services.reward.access import REWARD_ACCESS
from shared.grpc_server import GATEWAY, MONITORING, OPERATOR, TRAINER
from shared.pb import reward_pb2

CALLERS = {GATEWAY, TRAINER, OPERATOR, MONITORING}


def test_every_rpc_is_listed_with_known_callers():
    service = reward_pb2.DESCRIPTOR.services_by_name["RewardService"]
    assert REWARD_ACCESS.service == service.full_name
    rpcs = {m.name for m in service.methods}
    missing = rpcs - set(REWARD_ACCESS.rpcs)
    assert not missing, f"RPCs without a decision on who may call them (refused to everyone): {sorted(missing)}"
    for rpc, callers in REWARD_ACCESS.rpcs.items():
        assert callers and callers <= CALLERS, rpc


def test_only_the_trainer_scores_and_only_an_operator_releases_raters():
    assert REWARD_ACCESS.rpcs["Score"] == {TRAINER}
    assert REWARD_ACCESS.rpcs["ReleaseRater"] == {OPERATOR}
