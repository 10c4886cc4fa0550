"""Every RPC of the feedback service has a decision on who may call it, made of known callers."""

from services.feedback.access import FEEDBACK_ACCESS
from shared.grpc_server import GATEWAY, MONITORING, OPERATOR, TRAINER
from shared.pb import feedback_pb2

CALLERS = {GATEWAY, TRAINER, OPERATOR, MONITORING}


def test_every_rpc_is_listed_with_known_callers():
    service = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"]
    assert FEEDBACK_ACCESS.service == service.full_name
    rpcs = {m.name for m in service.methods}
    missing = rpcs - set(FEEDBACK_ACCESS.rpcs)
    assert not missing, f"RPCs without a decision on who may call them (refused to everyone): {sorted(missing)}"
    for rpc, callers in FEEDBACK_ACCESS.rpcs.items():
        assert callers and callers <= CALLERS, rpc


def test_only_the_gateway_submits_ratings():
    assert all(callers == {GATEWAY} for callers in FEEDBACK_ACCESS.rpcs.values())
