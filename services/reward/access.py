"""Who may call the reward service's RPCs (enforced by shared.grpc_server.AuthInterceptor)."""

from shared.grpc_server import MONITORING, OPERATOR, TRAINER, RpcAccess

REWARD_ACCESS = RpcAccess(
    "rlhf.v1.RewardService",
    {
        # The trainer scores rollouts and held-out answers; nobody else needs scores.
        "Score": frozenset({TRAINER}),
        "GetRewardModel": frozenset({TRAINER, OPERATOR, MONITORING}),
        # The rater quarantine: operators list and release principals.
        "ListRaters": frozenset({OPERATOR, MONITORING}),
        "ReleaseRater": frozenset({OPERATOR}),
    },
)
