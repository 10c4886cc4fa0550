"""gRPC FeedbackService: converts protobuf messages to domain objects and back, nothing more."""

from __future__ import annotations

import functools
from typing import Any

import grpc
from google.protobuf import text_format

from services.feedback.domain import Submission
from services.feedback.serving import FeedbackServing
from shared.errors import RlhfError
from shared.pb import feedback_pb2, feedback_pb2_grpc

_THUMB = {feedback_pb2.THUMB_UP: "up", feedback_pb2.THUMB_DOWN: "down"}


def submission_from_proto(msg: feedback_pb2.SubmitFeedbackRequest) -> Submission:
    kind = msg.WhichOneof("rating") or ""
    common: dict[str, Any] = dict(
        feedback_tokens=list(msg.feedback_tokens),
        principal=msg.principal,
        label=msg.user_id,
        comment=msg.comment,
        tags=list(msg.tags),
        idempotency_key=msg.idempotency_key,
    )
    if kind == "thumb":
        return Submission("thumb", [msg.thumb.response_id], thumb=_THUMB.get(msg.thumb.thumb, ""), **common)
    if kind == "likert":
        return Submission("likert", [msg.likert.response_id], score=msg.likert.score, **common)
    if kind == "pairwise":
        p = msg.pairwise
        return Submission("pairwise", [p.response_id_a, p.response_id_b], preferred=p.preferred, **common)
    if kind == "ranking":
        return Submission("ranking", list(msg.ranking.response_ids), ranks=list(msg.ranking.ranks) or None, **common)
    return Submission(kind, [], **common)


def _text(msg: feedback_pb2.SubmitFeedbackRequest) -> str:
    """The submission as received, for a dead-letter copy."""
    return text_format.MessageToString(msg, as_one_line=True)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, serving: FeedbackServing):
        self.serving = serving

    async def SubmitFeedback(
        self, request: feedback_pb2.SubmitFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitFeedbackResponse:
        result = await self.serving.submit(submission_from_proto(request), functools.partial(_text, request))
        return feedback_pb2.SubmitFeedbackResponse(
            feedback_id=result.feedback_id, revision=result.revision, duplicate=result.duplicate
        )

    async def SubmitFeedbackBatch(
        self, request: feedback_pb2.SubmitFeedbackBatchRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitFeedbackBatchResponse:
        outcomes = await self.serving.submit_many(
            [(submission_from_proto(item), functools.partial(_text, item)) for item in request.submissions]
        )
        reply = feedback_pb2.SubmitFeedbackBatchResponse()
        for outcome in outcomes:
            result = reply.results.add()
            if isinstance(outcome, RlhfError):
                result.error.code = outcome.grpc_code.value[0]
                result.error.message = outcome.message
                result.error.param = outcome.param or ""
            else:
                result.accepted.feedback_id = outcome.feedback_id
                result.accepted.revision = outcome.revision
                result.accepted.duplicate = outcome.duplicate
        return reply

    async def RejectFeedback(
        self, request: feedback_pb2.RejectFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.RejectFeedbackResponse:
        self.serving.reject(request.raw, request.reason or "refused", request.param or None, source="http")
        return feedback_pb2.RejectFeedbackResponse()
