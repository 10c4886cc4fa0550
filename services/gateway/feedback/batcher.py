"""The gateway's gRPC client of the feedback service, whose calls are shared by concurrent ratings.

Concurrent ratings share gRPC calls (``FeedbackBatcher``): on two cores a gRPC call per rating cost
more CPU than everything else a rating needs, and capped the path far below its target.
"""

from __future__ import annotations

import asyncio

import grpc

from services.gateway import metrics
from shared.errors import PARAM_METADATA_KEY, ResourceExhausted
from shared.grpc_channels import ClientCredentials, aio_channel
from shared.pb import feedback_pb2, feedback_pb2_grpc


class FeedbackBatcher:
    """Sends ratings to the feedback service in shared SubmitFeedbackBatch calls.

    A rating goes out at once while fewer than ``max_in_flight`` calls are running; ratings that
    arrive meanwhile wait for the next free call and go together (up to ``max_batch``). So a lone
    rating waits for nothing, and under load the cost of a call is shared by many ratings. Each
    rating still gets its own result: the service judges and stores every item on its own.

    At most ``max_waiting`` ratings wait; one more is refused at once (ResourceExhausted: HTTP 429
    with Retry-After) rather than held while the feedback service falls behind.
    """

    def __init__(
        self,
        stub: feedback_pb2_grpc.FeedbackServiceStub,
        timeout_s: float,
        *,
        max_batch: int = 256,
        max_in_flight: int = 4,
        max_waiting: int = 4096,
    ):
        self.stub = stub
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.max_waiting = max_waiting
        self._waiting: list[tuple[feedback_pb2.SubmitFeedbackRequest, asyncio.Future]] = []
        self._in_flight = 0
        self._scheduled = False
        self._batch_rpc = True
        self._calls: set[asyncio.Task] = set()

    async def submit(self, msg: feedback_pb2.SubmitFeedbackRequest) -> feedback_pb2.SubmitFeedbackResult:
        """The service's verdict on one rating; raises grpc.aio.AioRpcError when the call failed,
        ResourceExhausted when max_waiting ratings wait already."""
        if len(self._waiting) >= self.max_waiting:
            metrics.FEEDBACK_QUEUE_REFUSED.inc()
            raise ResourceExhausted(
                f"the gateway's queue of ratings for the feedback service is full ({self.max_waiting} waiting); retry later",
                retry_after_s=1.0,
            )
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((msg, done))
        metrics.FEEDBACK_QUEUE_DEPTH.set(len(self._waiting))
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
            metrics.FEEDBACK_QUEUE_DEPTH.set(len(self._waiting))
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
    """The gateway's gRPC channel to the feedback service; ratings go through its ``batcher``."""

    def __init__(self, address: str, credentials: ClientCredentials, timeout_s: float = 30.0, max_waiting: int = 4096):
        self.timeout_s = timeout_s
        self.channel = aio_channel(address, credentials)
        self.stub = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self.batcher = FeedbackBatcher(self.stub, timeout_s, max_waiting=max_waiting)

    async def close(self) -> None:
        await self.channel.close()
