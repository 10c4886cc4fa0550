"""Who may call the rollout service's RPCs (enforced by shared.grpc_server.AuthInterceptor): its
commands decide what every user is served, so only an operator may use them; Status is read-only."""

from shared.grpc_server import GATEWAY, MONITORING, OPERATOR, RpcAccess

ROLLOUT_ACCESS = RpcAccess(
    "rlhf.v1.RolloutService",
    {
        # The gateway routes by rlhf.rollout; it reads Status only for the live figures its read-only
        # /flywheel page shows between decisions (services/gateway/rollout/live.py).
        "Status": frozenset({OPERATOR, MONITORING, GATEWAY}),
        "Promote": frozenset({OPERATOR}),
        "Rollback": frozenset({OPERATOR}),
        "Pause": frozenset({OPERATOR}),
        "Resume": frozenset({OPERATOR}),
        "SetMode": frozenset({OPERATOR}),
    },
)
