"""Ratings over the feedback service: HTTP JSON in, gRPC call, JSON out. Only the shape is checked
here; the feedback service judges the values, verifies the tokens and writes to Kafka."""

from __future__ import annotations

import grpc
from pydantic import ValidationError

from services.gateway.protocol import FeedbackRequest, FeedbackResponse
from shared.errors import InvalidArgument, Unavailable
from shared.pb import feedback_pb2, feedback_pb2_grpc

_THUMBS = {"up": feedback_pb2.THUMB_UP, "down": feedback_pb2.THUMB_DOWN}
RAW_LIMIT = 8192


class FeedbackClient:
    def __init__(self, address: str, timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = feedback_pb2_grpc.FeedbackServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()


def to_submit_request(req: FeedbackRequest, idempotency_header: str | None) -> feedback_pb2.SubmitFeedbackRequest:
    msg = feedback_pb2.SubmitFeedbackRequest(
        feedback_tokens=req.feedback_tokens, user_id=req.user, comment=req.comment, tags=req.tags,
        idempotency_key=req.idempotency_key or idempotency_header or "")
    ids = req.response_ids or []
    if req.type == "thumb":
        # An unknown thumb value maps to THUMB_UNSPECIFIED, which the service refuses by name.
        msg.thumb.CopyFrom(feedback_pb2.ThumbRating(response_id=req.response_id or "",
                                                     thumb=_THUMBS.get(req.thumb or "", 0)))
    elif req.type == "likert":
        score = req.score if req.score is not None else 0
        if not 0 <= score <= 1000:
            raise InvalidArgument(f"score must be an integer from 1 to 7, got {score}", param="score")
        msg.likert.CopyFrom(feedback_pb2.LikertRating(response_id=req.response_id or "", score=score))
    elif req.type == "pairwise":
        if len(ids) != 2:
            raise InvalidArgument(f"a pairwise rating compares 2 response ids, got {len(ids)}", param="response_ids")
        msg.pairwise.CopyFrom(feedback_pb2.PairwiseChoice(response_id_a=ids[0], response_id_b=ids[1],
                                                          preferred=req.preferred or ""))
    elif req.type == "ranking":
        msg.ranking.CopyFrom(feedback_pb2.Ranking(response_ids=ids))
    else:
        raise InvalidArgument(f"type must be thumb, likert, pairwise or ranking, got {req.type!r}", param="type")
    return msg


class FeedbackForwarding:
    def __init__(self) -> None:
        self._client: FeedbackClient | None = None

    def attach(self, client: FeedbackClient | None) -> None:
        self._client = client

    async def submit(self, body: bytes, idempotency_header: str | None) -> FeedbackResponse:
        if self._client is None:
            raise Unavailable("feedback is not enabled on this gateway (RLHF_GATEWAY_FEEDBACK_ADDRESS is empty)")
        try:
            req = FeedbackRequest.model_validate_json(body)
            msg = to_submit_request(req, idempotency_header)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ())) or None
            if first.get("type") == "json_invalid":
                message = "the request body is not valid JSON"
            elif first.get("type") in ("model_type", "model_attributes_type"):
                message = "the request body must be a JSON object"
            else:
                message = f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))
            await self._reject(body, message, loc)
            raise InvalidArgument(message, param=loc) from None
        except InvalidArgument as exc:
            await self._reject(body, exc.message, exc.param)
            raise
        reply = await self._client.stub.SubmitFeedback(msg, timeout=self._client.timeout_s)
        return FeedbackResponse(feedback_id=reply.feedback_id, revision=reply.revision, duplicate=reply.duplicate)

    async def _reject(self, body: bytes, reason: str, param: str | None) -> None:
        """Hand a refused body to the feedback service's dead-letter topic; the client's 400 does not wait on it."""
        try:
            await self._client.stub.RejectFeedback(feedback_pb2.RejectFeedbackRequest(
                raw=body[:RAW_LIMIT].decode(errors="replace"), reason=reason, param=param or ""), timeout=2)
        except grpc.aio.AioRpcError:
            pass  # the dead-letter copy is best effort; the refusal itself stands
