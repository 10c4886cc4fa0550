"""Ratings over the feedback service: the raw JSON body in, gRPC call, FeedbackResponse out. Only the
shape is checked here; the feedback service judges the values, verifies the tokens and writes to Kafka.

No HTTP here (see fast_path.py): plain async calls. The gRPC calls go through the FeedbackClient's
batcher (batcher.py), shared by concurrent ratings.
"""

from __future__ import annotations

import grpc
from pydantic import ValidationError

from services.gateway.errors import UpstreamRefusal
from services.gateway.feedback.batcher import FeedbackClient
from services.gateway.feedback.schema import FeedbackRequest, FeedbackResponse
from shared.errors import InvalidArgument, Unavailable
from shared.pb import feedback_pb2

_THUMBS = {"up": feedback_pb2.THUMB_UP, "down": feedback_pb2.THUMB_DOWN}
RAW_LIMIT = 8192


def to_submit_request(
    req: FeedbackRequest, idempotency_header: str | None, principal: str
) -> feedback_pb2.SubmitFeedbackRequest:
    msg = feedback_pb2.SubmitFeedbackRequest(
        feedback_tokens=req.feedback_tokens,
        principal=principal,
        user_id=req.user,
        comment=req.comment,
        tags=req.tags,
        idempotency_key=req.idempotency_key or idempotency_header or "",
    )
    ids = req.response_ids or []
    if req.ranks is not None and req.type != "ranking":
        raise InvalidArgument(f"ranks belongs to ranking ratings, not {req.type}", param="ranks")
    if req.type == "thumb":
        # An unknown thumb value maps to THUMB_UNSPECIFIED, which the service refuses by name.
        msg.thumb.CopyFrom(
            feedback_pb2.ThumbRating(
                response_id=req.response_id or "", thumb=_THUMBS.get(req.thumb or "", feedback_pb2.THUMB_UNSPECIFIED)
            )
        )
    elif req.type == "likert":
        score = req.score if req.score is not None else 0
        if not 0 <= score <= 1000:
            raise InvalidArgument(f"score must be an integer from 1 to 7, got {score}", param="score")
        msg.likert.CopyFrom(feedback_pb2.LikertRating(response_id=req.response_id or "", score=score))
    elif req.type == "pairwise":
        if len(ids) != 2:
            raise InvalidArgument(f"a pairwise rating compares 2 response ids, got {len(ids)}", param="response_ids")
        msg.pairwise.CopyFrom(
            feedback_pb2.PairwiseChoice(response_id_a=ids[0], response_id_b=ids[1], preferred=req.preferred or "")
        )
    elif req.type == "ranking":
        ranks = req.ranks or []
        if any(not 1 <= r <= 1000 for r in ranks):  # uint32 on the wire; the service checks the rest
            raise InvalidArgument("ranks must be positive integers (1 = best)", param="ranks")
        msg.ranking.CopyFrom(feedback_pb2.Ranking(response_ids=ids, ranks=ranks))
    else:
        raise InvalidArgument(f"type must be thumb, likert, pairwise or ranking, got {req.type!r}", param="type")
    return msg


class FeedbackForwarding:
    """A rating's work behind POST /v1/feedback: check its shape, forward it, answer; a refused body
    also goes to the feedback service's dead-letter topic."""

    def __init__(self) -> None:
        self._client: FeedbackClient | None = None

    def attach(self, client: FeedbackClient | None) -> None:
        self._client = client

    async def submit(self, body: bytes, idempotency_header: str | None, principal: str) -> FeedbackResponse:
        """Forward one rating by ``principal`` (as the gateway authenticated it)."""
        if self._client is None:
            raise Unavailable("feedback is not enabled on this gateway (RLHF_GATEWAY_FEEDBACK_ADDRESS is empty)")
        try:
            req = FeedbackRequest.model_validate_json(body)
            msg = to_submit_request(req, idempotency_header, principal)
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
        result = await self._client.batcher.submit(msg)
        if result.HasField("error"):
            raise UpstreamRefusal(result.error.code, result.error.message, result.error.param or None)
        reply = result.accepted
        return FeedbackResponse(feedback_id=reply.feedback_id, revision=reply.revision, duplicate=reply.duplicate)

    async def _reject(self, body: bytes, reason: str, param: str | None) -> None:
        """Hand a refused body to the feedback service's dead-letter topic; the client's 400 does not wait on it."""
        assert self._client is not None  # only submit() calls this, after checking
        try:
            await self._client.stub.RejectFeedback(
                feedback_pb2.RejectFeedbackRequest(
                    raw=body[:RAW_LIMIT].decode(errors="replace"), reason=reason, param=param or ""
                ),
                timeout=2,
            )
        except grpc.aio.AioRpcError:
            pass  # the dead-letter copy is best effort; the refusal itself stands
