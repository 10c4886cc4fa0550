"""Who may call the inference service's RPCs (enforced by shared.grpc_server.AuthInterceptor)."""

from shared.grpc_server import GATEWAY, MONITORING, OPERATOR, TRAINER, RpcAccess

INFERENCE_ACCESS = RpcAccess(
    "rlhf.v1.InferenceService",
    {
        # Users' chats come through the gateway; the trainer samples its rollouts here.
        "Generate": frozenset({GATEWAY, TRAINER}),
        "GenerateStream": frozenset({GATEWAY, TRAINER}),
        "GetPolicy": frozenset({GATEWAY, TRAINER, OPERATOR, MONITORING}),
        # Read-only load figures: the trainer yields rollout sampling to users by them.
        "GetLoad": frozenset({TRAINER, OPERATOR, MONITORING}),
    },
)
