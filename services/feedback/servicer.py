"""gRPC FeedbackService: converts protobuf messages to domain objects and back, nothing more."""

from __future__ import annotations

import grpc
from google.protobuf import text_format

from services.feedback.protocol import Submission
from services.feedback.serving import FeedbackServing
from shared.pb import feedback_pb2, feedback_pb2_grpc

_THUMB = {feedback_pb2.THUMB_UP: "up", feedback_pb2.THUMB_DOWN: "down"}


def submission_from_proto(msg: feedback_pb2.SubmitFeedbackRequest) -> Submission:
    kind = msg.WhichOneof("rating") or ""
    common = dict(feedback_tokens=list(msg.feedback_tokens), user_id=msg.user_id, comment=msg.comment,
                  tags=list(msg.tags), idempotency_key=msg.idempotency_key)
    if kind == "thumb":
        return Submission("thumb", [msg.thumb.response_id], thumb=_THUMB.get(msg.thumb.thumb, ""), **common)
    if kind == "likert":
        return Submission("likert", [msg.likert.response_id], score=msg.likert.score, **common)
    if kind == "pairwise":
        p = msg.pairwise
        return Submission("pairwise", [p.response_id_a, p.response_id_b], preferred=p.preferred, **common)
    if kind == "ranking":
        return Submission("ranking", list(msg.ranking.response_ids), **common)
    return Submission(kind, [], **common)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, serving: FeedbackServing):
        self.serving = serving

    async def SubmitFeedback(self, request, context: grpc.aio.ServicerContext):
        result = await self.serving.submit(submission_from_proto(request),
                                           lambda: text_format.MessageToString(request, as_one_line=True))
        return feedback_pb2.SubmitFeedbackResponse(feedback_id=result.feedback_id, revision=result.revision,
                                                   duplicate=result.duplicate)

    async def RejectFeedback(self, request, context: grpc.aio.ServicerContext):
        self.serving.reject(request.raw, request.reason or "refused", request.param or None, source="http")
        return feedback_pb2.RejectFeedbackResponse()
