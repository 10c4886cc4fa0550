"""Every RPC of the trainer service has a decision on who may call it, made of known callers."""

from services.trainer.access import TRAINER_ACCESS
from shared.grpc_server import GATEWAY, MONITORING, OPERATOR, TRAINER
from shared.pb import trainer_pb2

CALLERS = {GATEWAY, TRAINER, OPERATOR, MONITORING}


def test_every_rpc_is_listed_with_known_callers():
    service = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]
    assert TRAINER_ACCESS.service == service.full_name
    rpcs = {m.name for m in service.methods}
    missing = rpcs - set(TRAINER_ACCESS.rpcs)
    assert not missing, f"RPCs without a decision on who may call them (refused to everyone): {sorted(missing)}"
    for rpc, callers in TRAINER_ACCESS.rpcs.items():
        assert callers and callers <= CALLERS, rpc


def test_only_an_operator_controls_the_trainer():
    for rpc in ("Pause", "Resume", "PublishNow", "Rollback"):
        assert TRAINER_ACCESS.rpcs[rpc] == {OPERATOR}, rpc
    assert GATEWAY not in TRAINER_ACCESS.rpcs["Status"] and TRAINER not in TRAINER_ACCESS.rpcs["Status"]
