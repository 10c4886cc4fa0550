"""Who may call the rollout service's RPCs (enforced by shared.grpc_server.AuthInterceptor): its
commands decide what every user is served, so only an operator may use them; Status is read-only."""

from shared.grpc_server import MONITORING, OPERATOR, RpcAccess

ROLLOUT_ACCESS = RpcAccess(
    "rlhf.v1.RolloutService",
    {
        # The gateway and the /flywheel page follow rlhf.rollout instead: they need no call here.
        "Status": frozenset({OPERATOR, MONITORING}),
        "Promote": frozenset({OPERATOR}),
        "Rollback": frozenset({OPERATOR}),
        "Pause": frozenset({OPERATOR}),
        "Resume": frozenset({OPERATOR}),
        "SetMode": frozenset({OPERATOR}),
    },
)
