"""Ratings over the feedback service: HTTP JSON in, gRPC call, JSON out. Only the shape is checked
here; the feedback service judges the values, verifies the tokens and writes to Kafka.

Concurrent ratings share gRPC calls (``FeedbackBatcher``): on two cores a gRPC call per rating cost
more CPU than everything else a rating needs, and capped the path far below its target.
"""

from __future__ import annotations

import asyncio

import grpc
from pydantic import ValidationError

from services.gateway.errors import UpstreamRefusal
from services.gateway.protocol import FeedbackRequest, FeedbackResponse
from shared.errors import PARAM_METADATA_KEY, InvalidArgument, Unavailable
from shared.pb import feedback_pb2, feedback_pb2_grpc

_THUMBS = {"up": feedback_pb2.THUMB_UP, "down": feedback_pb2.THUMB_DOWN}
RAW_LIMIT = 8192


class FeedbackBatcher:
    """Sends ratings to the feedback service in shared SubmitFeedbackBatch calls.

    A rating goes out at once while fewer than ``max_in_flight`` calls are running; ratings that
    arrive meanwhile wait for the next free call and go together (up to ``max_batch``). So a lone
    rating waits for nothing, and under load the cost of a call is shared by many ratings. Each
    rating still gets its own result: the service judges and stores every item on its own.
    """

    def __init__(
        self,
        stub: feedback_pb2_grpc.FeedbackServiceStub,
        timeout_s: float,
        *,
        max_batch: int = 256,
        max_in_flight: int = 4,
    ):
        self.stub = stub
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._waiting: list[tuple[feedback_pb2.SubmitFeedbackRequest, asyncio.Future]] = []
        self._in_flight = 0
        self._scheduled = False
        self._batch_rpc = True
        self._calls: set[asyncio.Task] = set()

    async def submit(self, msg: feedback_pb2.SubmitFeedbackRequest) -> feedback_pb2.SubmitFeedbackResult:
        """The service's verdict on one rating; raises grpc.aio.AioRpcError when the call failed."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((msg, done))
        self._schedule()
        return await done

    def _schedule(self) -> None:
        # call_soon, not an immediate send: ratings parsed in the same loop iteration go together.
        if not self._scheduled and self._waiting and self._in_flight < self.max_in_flight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_waiting)

    def _send_waiting(self) -> None:
        self._scheduled = False
        while self._waiting and self._in_flight < self.max_in_flight:
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            self._in_flight += 1
            call = asyncio.ensure_future(self._call(batch))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _call(self, batch: list[tuple[feedback_pb2.SubmitFeedbackRequest, asyncio.Future]]) -> None:
        try:
            results = await self._results([msg for msg, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every waiting rating gets the call's failure
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
        else:
            for (_, done), result in zip(batch, results, strict=True):
                if not done.done():  # its HTTP client may have gone away
                    done.set_result(result)
        finally:
            self._in_flight -= 1
            self._schedule()

    async def _results(self, msgs: list[feedback_pb2.SubmitFeedbackRequest]) -> list[feedback_pb2.SubmitFeedbackResult]:
        if self._batch_rpc:
            try:
                reply = await self.stub.SubmitFeedbackBatch(
                    feedback_pb2.SubmitFeedbackBatchRequest(submissions=msgs), timeout=self.timeout_s
                )
                return list(reply.results)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._batch_rpc = False  # an older feedback service (during a rolling update)
        return list(await asyncio.gather(*(self._one(msg) for msg in msgs)))

    async def _one(self, msg: feedback_pb2.SubmitFeedbackRequest) -> feedback_pb2.SubmitFeedbackResult:
        """A result from the one-rating call, so both calls look alike to ``submit``'s callers."""
        try:
            reply = await self.stub.SubmitFeedback(msg, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            param = dict(exc.trailing_metadata() or ()).get(PARAM_METADATA_KEY, "")
            return feedback_pb2.SubmitFeedbackResult(
                error=feedback_pb2.FeedbackError(code=exc.code().value[0], message=exc.details() or "", param=param)
            )
        return feedback_pb2.SubmitFeedbackResult(accepted=reply)


class FeedbackClient:
    def __init__(self, address: str, timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self.batcher = FeedbackBatcher(self.stub, timeout_s)

    async def close(self) -> None:
        await self.channel.close()


def to_submit_request(req: FeedbackRequest, idempotency_header: str | None) -> feedback_pb2.SubmitFeedbackRequest:
    msg = feedback_pb2.SubmitFeedbackRequest(
        feedback_tokens=req.feedback_tokens,
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
            feedback_pb2.ThumbRating(response_id=req.response_id or "", thumb=_THUMBS.get(req.thumb or "", 0))
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
        result = await self._client.batcher.submit(msg)
        if result.HasField("error"):
            raise UpstreamRefusal(result.error.code, result.error.message, result.error.param or None)
        reply = result.accepted
        return FeedbackResponse(feedback_id=reply.feedback_id, revision=reply.revision, duplicate=reply.duplicate)

    async def _reject(self, body: bytes, reason: str, param: str | None) -> None:
        """Hand a refused body to the feedback service's dead-letter topic; the client's 400 does not wait on it."""
        try:
            await self._client.stub.RejectFeedback(
                feedback_pb2.RejectFeedbackRequest(
                    raw=body[:RAW_LIMIT].decode(errors="replace"), reason=reason, param=param or ""
                ),
                timeout=2,
            )
        except grpc.aio.AioRpcError:
            pass  # the dead-letter copy is best effort; the refusal itself stands
