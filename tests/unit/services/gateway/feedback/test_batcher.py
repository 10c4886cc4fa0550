"""The gateway's FeedbackBatcher against real gRPC servers on loopback: ratings that arrive while a
call is in flight share the next call, each rating gets its own item's verdict, a failed call fails
exactly its ratings, and an older feedback service without the batch call is served one by one."""

import asyncio

import grpc
import pytest

from services.gateway.feedback.batcher import FeedbackBatcher
from shared.pb import feedback_pb2, feedback_pb2_grpc

pytestmark = pytest.mark.integration


def rating(i: int) -> feedback_pb2.SubmitFeedbackRequest:
    return feedback_pb2.SubmitFeedbackRequest(
        thumb=feedback_pb2.ThumbRating(response_id=f"r{i}", thumb=feedback_pb2.THUMB_UP), user_id=f"u{i}"
    )


class RecordingService(feedback_pb2_grpc.FeedbackServiceServicer):
    """Accepts even-numbered users, refuses odd ones; the first call waits for ``release``."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.release = asyncio.Event()
        self.fail_next = False

    async def SubmitFeedbackBatch(self, request, context):
        self.batch_sizes.append(len(request.submissions))
        if len(self.batch_sizes) == 1:
            await self.release.wait()
        if self.fail_next:
            self.fail_next = False
            await context.abort(grpc.StatusCode.UNAVAILABLE, "kafka is down")
        reply = feedback_pb2.SubmitFeedbackBatchResponse()
        for item in request.submissions:
            n = int(item.user_id[1:])
            if n % 2:
                reply.results.add().error.CopyFrom(
                    feedback_pb2.FeedbackError(
                        code=grpc.StatusCode.PERMISSION_DENIED.value[0],
                        message=f"no token for {n}",
                        param="feedback_tokens",
                    )
                )
            else:
                reply.results.add().accepted.CopyFrom(
                    feedback_pb2.SubmitFeedbackResponse(feedback_id=f"f{n}", revision=1)
                )
        return reply


class OldService(feedback_pb2_grpc.FeedbackServiceServicer):
    """A feedback service from before SubmitFeedbackBatch existed."""

    def __init__(self) -> None:
        self.calls = 0

    async def SubmitFeedback(self, request, context):
        self.calls += 1
        if request.user_id == "u1":
            context.set_trailing_metadata((("rlhf-error-param", "thumb"),))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad thumb")
        return feedback_pb2.SubmitFeedbackResponse(feedback_id=f"f-{request.user_id}", revision=1)


async def serve(servicer) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    server = grpc.aio.server()
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def test_ratings_arriving_during_a_call_share_the_next_one_and_keep_their_own_verdicts():
    async def scenario():
        service = RecordingService()
        server, channel = await serve(service)
        try:
            batcher = FeedbackBatcher(feedback_pb2_grpc.FeedbackServiceStub(channel), 10, max_in_flight=1)
            first = asyncio.ensure_future(batcher.submit(rating(0)))
            while not service.batch_sizes:
                await asyncio.sleep(0.01)
            rest = [asyncio.ensure_future(batcher.submit(rating(i))) for i in range(1, 11)]
            await asyncio.sleep(0.1)
            assert service.batch_sizes == [1], "nothing else may go out while the only call slot is busy"
            service.release.set()
            results = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
            return service.batch_sizes, results
        finally:
            await channel.close()
            await server.stop(0)

    sizes, results = asyncio.run(scenario())
    assert sizes == [1, 10]
    for i, result in enumerate(results):
        if i % 2:
            assert result.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
            assert result.error.message == f"no token for {i}" and result.error.param == "feedback_tokens"
        else:
            assert result.accepted.feedback_id == f"f{i}"


def test_a_failed_call_fails_its_ratings_only_and_later_calls_go_on():
    async def scenario():
        service = RecordingService()
        service.release.set()
        service.fail_next = True
        server, channel = await serve(service)
        try:
            batcher = FeedbackBatcher(feedback_pb2_grpc.FeedbackServiceStub(channel), 10)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await batcher.submit(rating(0))
            later = await batcher.submit(rating(2))
            return failed.value.code(), later
        finally:
            await channel.close()
            await server.stop(0)

    code, later = asyncio.run(scenario())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert later.accepted.feedback_id == "f2"


def test_an_older_service_without_the_batch_call_is_served_one_rating_at_a_time():
    async def scenario():
        service = OldService()
        server, channel = await serve(service)
        try:
            batcher = FeedbackBatcher(feedback_pb2_grpc.FeedbackServiceStub(channel), 10)
            results = await asyncio.gather(*(batcher.submit(rating(i)) for i in range(4)))
            return service.calls, results
        finally:
            await channel.close()
            await server.stop(0)

    calls, results = asyncio.run(scenario())
    assert calls == 4
    assert [r.accepted.feedback_id for r in results if r.HasField("accepted")] == ["f-u0", "f-u2", "f-u3"]
    assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results[1].error.param == "thumb" and results[1].error.message == "bad thumb"


def test_a_rating_past_the_queue_bound_is_refused_at_once_and_counted():
    from prometheus_client import REGISTRY

    from shared.errors import ResourceExhausted

    def refused() -> float:
        return REGISTRY.get_sample_value("rlhf_gateway_feedback_queue_refused_total") or 0

    async def scenario():
        service = RecordingService()
        server, channel = await serve(service)
        try:
            batcher = FeedbackBatcher(
                feedback_pb2_grpc.FeedbackServiceStub(channel), 10, max_in_flight=1, max_waiting=3
            )
            first = asyncio.ensure_future(batcher.submit(rating(0)))
            while not service.batch_sizes:
                await asyncio.sleep(0.01)
            waiting = [asyncio.ensure_future(batcher.submit(rating(i))) for i in (2, 4, 6)]
            await asyncio.sleep(0.05)
            depth = REGISTRY.get_sample_value("rlhf_gateway_feedback_queue_depth")
            before = refused()
            with pytest.raises(ResourceExhausted) as full:
                await batcher.submit(rating(8))
            counted = refused() - before
            service.release.set()
            results = await asyncio.wait_for(asyncio.gather(first, *waiting), 10)
            return depth, full.value, counted, results, service.batch_sizes
        finally:
            await channel.close()
            await server.stop(0)

    depth, full, counted, results, sizes = asyncio.run(scenario())
    assert depth == 3 and counted == 1
    assert full.http_status == 429 and full.retry_after_s > 0 and "queue" in full.message
    assert [r.accepted.feedback_id for r in results] == ["f0", "f2", "f4", "f6"], "the queued ones are served"
    assert sizes == [1, 3], "the refused rating never reached the service"
