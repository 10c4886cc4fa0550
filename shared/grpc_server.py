"""gRPC server glue every service uses: error mapping, honest health, graceful SIGTERM.

server = GrpcServer("inference", host, port, grace_period_s=10)
inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server.server)
await server.start()          # health: NOT_SERVING
...load the model...
server.set_serving()          # health: SERVING
await server.wait()           # until SIGTERM/SIGINT, then drain and stop
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared.errors import PARAM_METADATA_KEY, RlhfError
from shared.logging import get_logger, log_event

log = get_logger(__name__)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turn a RlhfError raised by a servicer into its status code; log anything unexpected.

    The one place where service exceptions become gRPC statuses.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner(request, context)
                except RlhfError as exc:
                    await _abort(context, exc, method)

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except RlhfError as exc:
                    await _abort(context, exc, method)

            return handler._replace(unary_stream=unary_stream)
        return handler


async def _abort(context: grpc.aio.ServicerContext, exc: RlhfError, method: str) -> None:
    if exc.grpc_code == grpc.StatusCode.INTERNAL:
        log.exception("internal error in %s", method)
    if exc.param:
        context.set_trailing_metadata(((PARAM_METADATA_KEY, exc.param),))
    await context.abort(exc.grpc_code, exc.message)


class GrpcServer:
    """A grpc.aio server with health checking, the error interceptor and signal handling."""

    def __init__(
        self, service_name: str, host: str, port: int, *, grace_period_s: float = 10.0, max_message_mb: int = 64
    ):
        self.service_name = service_name
        self.grace_period_s = grace_period_s
        opts = [
            ("grpc.max_receive_message_length", max_message_mb << 20),
            ("grpc.max_send_message_length", max_message_mb << 20),
        ]
        self.server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=opts)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {host}:{port}")
        self.address = f"{host}:{self.port}"
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Start listening; health reports NOT_SERVING until ``set_serving``."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log_event(log, "gRPC server listening", service=self.service_name, address=self.address)

    async def set_serving(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log_event(log, "serving", service=self.service_name, address=self.address)

    async def _set_health(self, status: int) -> None:
        # "" is the whole server; the service name is what Kubernetes' grpc probe may ask for.
        for name in ("", f"rlhf.v1.{self.service_name}"):
            await self.health.set(name, status)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_for_stop_request(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Report NOT_SERVING, let requests in flight finish (up to the grace period), stop."""
        log_event(log, "draining", service=self.service_name, grace_s=self.grace_period_s)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_period_s)
        log_event(log, "stopped", service=self.service_name)
