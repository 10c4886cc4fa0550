"""Who may call the feedback service's RPCs (enforced by shared.grpc_server.AuthInterceptor)."""

from shared.grpc_server import GATEWAY, RpcAccess

FEEDBACK_ACCESS = RpcAccess(
    "rlhf.v1.FeedbackService",
    {
        # Only the gateway, which authenticated the user and names the principal, submits ratings.
        "SubmitFeedback": frozenset({GATEWAY}),
        "SubmitFeedbackBatch": frozenset({GATEWAY}),
        "RejectFeedback": frozenset({GATEWAY}),
    },
)
