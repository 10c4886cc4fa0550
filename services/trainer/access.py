"""Who may call the trainer's RPCs (enforced by shared.grpc_server.AuthInterceptor): its control
RPCs change what users are served, so only an operator may use them."""

from shared.grpc_server import MONITORING, OPERATOR, RpcAccess

TRAINER_ACCESS = RpcAccess(
    "rlhf.v1.TrainerService",
    {
        "Status": frozenset({OPERATOR, MONITORING}),
        "Pause": frozenset({OPERATOR}),
        "Resume": frozenset({OPERATOR}),
        "PublishNow": frozenset({OPERATOR}),
        "Rollback": frozenset({OPERATOR}),
    },
)
