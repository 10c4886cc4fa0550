"""Every RPC of the rollout service has a decision on who may call it; only operators act."""

from services.rollout.access import ROLLOUT_ACCESS
from shared.grpc_server import GATEWAY, MONITORING, OPERATOR, TRAINER
from shared.pb import rollout_pb2

CALLERS = {GATEWAY, TRAINER, OPERATOR, MONITORING}


def test_every_rpc_is_listed_with_known_callers():
    service = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"]
    assert ROLLOUT_ACCESS.service == service.full_name
    rpcs = {m.name for m in service.methods}
    assert rpcs == set(ROLLOUT_ACCESS.rpcs), f"RPCs without a decision: {sorted(rpcs - set(ROLLOUT_ACCESS.rpcs))}"
    for rpc, callers in ROLLOUT_ACCESS.rpcs.items():
        assert callers and callers <= CALLERS, rpc


def test_only_an_operator_changes_the_rollout_and_the_gateway_only_reads_it():
    for rpc in ("Promote", "Rollback", "Pause", "Resume", "SetMode"):
        assert ROLLOUT_ACCESS.rpcs[rpc] == {OPERATOR}, rpc
    assert ROLLOUT_ACCESS.rpcs["Status"] == {OPERATOR, MONITORING, GATEWAY}  # /flywheel's live figures
    assert not {TRAINER} & set().union(*ROLLOUT_ACCESS.rpcs.values())
