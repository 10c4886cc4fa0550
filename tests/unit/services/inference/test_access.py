"""Every RPC of the inference service has a decision on who may call it, made of known callers."""

from services.inference.access import INFERENCE_ACCESS
from shared.grpc_server import GATEWAY, MONITORING, OPERATOR, TRAINER
from shared.pb import inference_pb2

CALLERS = {GATEWAY, TRAINER, OPERATOR, MONITORING}


def test_every_rpc_is_listed_with_known_callers():
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    assert INFERENCE_ACCESS.service == service.full_name
    rpcs = {m.name for m in service.methods}
    missing = rpcs - set(INFERENCE_ACCESS.rpcs)
    assert not missing, f"RPCs without a decision on who may call them (refused to everyone): {sorted(missing)}"
    for rpc, callers in INFERENCE_ACCESS.rpcs.items():
        assert callers and callers <= CALLERS, rpc


def test_generation_is_for_the_gateway_and_the_trainer():
    assert INFERENCE_ACCESS.rpcs["Generate"] == INFERENCE_ACCESS.rpcs["GenerateStream"] == {GATEWAY, TRAINER}
