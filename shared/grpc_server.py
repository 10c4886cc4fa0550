"""gRPC server glue every service uses: caller authentication, error mapping, honest health, TLS,
graceful SIGTERM.

server = GrpcServer("inference", host, port, auth=cfg.auth, access=INFERENCE_ACCESS, grace_period_s=10)
inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server.server)
await server.start()          # health: NOT_SERVING
...load the model...
server.set_serving()          # health: SERVING
await server.wait()           # until SIGTERM/SIGINT, then drain and stop
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge

from shared.config import ConfigError, ServiceAuthConfig, token_digest
from shared.errors import PARAM_METADATA_KEY, PermissionDenied, RlhfError, Unauthenticated
from shared.logging import get_logger, log_event

log = get_logger(__name__)

CALLS_REFUSED = Counter(
    "rlhf_grpc_calls_refused_total",
    "gRPC calls refused before reaching the service: reason missing_credential, unknown_credential "
    "(UNAUTHENTICATED) or not_allowed (PERMISSION_DENIED)",
    ["service", "reason"],
)

# --- callers and who may call what -------------------------------------------------------------

GATEWAY = "gateway"
"""The HTTP gateway: generates through inference, forwards ratings to feedback."""
TRAINER = "trainer"
"""The PPO trainer: samples through inference, scores through reward."""
OPERATOR = "operator"
"""A person (or their tooling) controlling the loop: the trainer's control RPCs."""
MONITORING = "monitoring"
"""Read-only observers: status and version RPCs."""

AUTH_METADATA_KEY = "authorization"
"""The metadata key carrying ``Bearer <token>``."""

OPEN_METHODS = frozenset(
    {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/List"}
)
"""Methods any caller may use without a credential: health, for probes and load balancers."""


@dataclass(frozen=True)
class RpcAccess:
    """Which callers may use each RPC of one gRPC service; declared next to its servicer.

    An RPC that is not listed is refused to everyone (PERMISSION_DENIED): a new RPC is closed until
    someone decides who may call it.
    """

    service: str
    """Full service name, e.g. ``rlhf.v1.TrainerService``."""
    rpcs: Mapping[str, frozenset[str]]
    """RPC name -> caller names allowed to call it."""

    def methods(self) -> dict[str, frozenset[str]]:
        """Full method path (``/rlhf.v1.TrainerService/Rollback``) -> allowed caller names."""
        return {f"/{self.service}/{rpc}": callers for rpc, callers in self.rpcs.items()}


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the ``authorization: Bearer <token>`` metadata entry, or None when there is none.

    The scheme is case-insensitive (RFC 7235); a value that is not ``Bearer <token>`` counts as none.
    """
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def refusal(
    method: str, token: str | None, accepted: Mapping[bytes, str], allowed: Mapping[str, frozenset[str]]
) -> tuple[str, str] | None:
    """Why a call of ``method`` presenting ``token`` is refused: (reason, caller) or None to let it in.

    Rule: open methods (health) pass; no token -> ``missing_credential``; a token whose SHA-256 is not
    accepted -> ``unknown_credential``; a caller not in ``allowed[method]`` (an unlisted method allows
    nobody) -> ``not_allowed``. The caller is '' until it is known.
    """
    if method in OPEN_METHODS:
        return None
    if token is None:
        return "missing_credential", ""
    caller = accepted.get(token_digest(token))
    if caller is None:
        return "unknown_credential", ""
    if caller not in allowed.get(method, frozenset()):
        return "not_allowed", caller
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuse every call that does not carry an accepted credential of a caller allowed for its RPC.

    Refused calls never reach the servicer and their request is never parsed; each is counted
    (``rlhf_grpc_calls_refused_total{service,reason}``) and logged at most once a minute per
    (method, reason, caller).
    """

    LOG_EVERY_S = 60.0

    def __init__(self, service_name: str, accepted: Mapping[bytes, str], access: Sequence[RpcAccess]):
        self.service_name = service_name
        self.accepted = dict(accepted)
        self.allowed: dict[str, frozenset[str]] = {}
        for a in access:
            self.allowed.update(a.methods())
        self._logged: dict[tuple[str, str, str], float] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        refused = refusal(method, bearer_token(handler_call_details.invocation_metadata), self.accepted, self.allowed)
        if refused is None:
            return await continuation(handler_call_details)
        reason, caller = refused
        CALLS_REFUSED.labels(self.service_name, reason).inc()
        self._log(method, reason, caller)
        if reason == "not_allowed":
            code, message = PermissionDenied.grpc_code, f"caller {caller!r} may not call {method}"
        elif reason == "missing_credential":
            code, message = Unauthenticated.grpc_code, "no credential: send metadata 'authorization: Bearer <token>'"
        else:
            code, message = Unauthenticated.grpc_code, "unknown credential"
        handler = await continuation(handler_call_details)
        return _refusing_handler(handler, code, message)

    def _log(self, method: str, reason: str, caller: str) -> None:
        # Bounded: known methods (any other name a caller sends counts as one) x 3 reasons x the
        # accepted caller names ('' when unknown).
        key = (method if method in self.allowed or method in OPEN_METHODS else "<unknown>", reason, caller)
        now = time.monotonic()
        if now - self._logged.get(key, -self.LOG_EVERY_S) >= self.LOG_EVERY_S:
            self._logged[key] = now
            log_event(
                log,
                "gRPC call refused",
                level=30,
                service=self.service_name,
                method=method,
                reason=reason,
                caller=caller,
            )


def _refusing_handler(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with ``code``; it reads no request."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # unreachable: abort raises; makes this an async generator

    request_streaming = bool(handler and handler.request_streaming)
    response_streaming = bool(handler and handler.response_streaming)
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


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
        if handler.unary_stream and inspect.iscoroutinefunction(handler.unary_stream):
            # A streaming method that writes with context.write (grpc.health.v1's Watch), not by yielding.
            inner_writer = handler.unary_stream

            async def unary_stream_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                try:
                    await inner_writer(request, context)
                except RlhfError as exc:
                    await _abort(context, exc, method)

            return handler._replace(unary_stream=unary_stream_writer)
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


# --- TLS -------------------------------------------------------------------------------------------


def _read_pem(path: Path, variable: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{variable}={str(path)!r}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{variable}={str(path)!r}: not a PEM file")
    return data


class _ReloadingCertificates:
    """The server's certificate configuration, read again when a file changes (cert-manager renews
    certificates in place): gRPC asks at every new TLS handshake; a stat of three files answers."""

    def __init__(self, auth: ServiceAuthConfig):
        assert auth.tls_cert_file is not None and auth.tls_key_file is not None
        self.files = [(auth.tls_key_file, "RLHF_AUTH_TLS_KEY_FILE"), (auth.tls_cert_file, "RLHF_AUTH_TLS_CERT_FILE")]
        self.ca = (auth.tls_ca_file, "RLHF_AUTH_TLS_CA_FILE") if auth.tls_client_auth else None
        self._stamp = self._stamps()
        self.initial = self._load()

    def _stamps(self) -> tuple[float, ...]:
        paths = [p for p, _ in self.files] + ([self.ca[0]] if self.ca and self.ca[0] else [])
        try:
            return tuple(os.stat(p).st_mtime for p in paths)
        except OSError:
            return ()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        (key_path, key_var), (cert_path, cert_var) = self.files
        root = _read_pem(self.ca[0], self.ca[1]) if self.ca and self.ca[0] else None
        pair = (_read_pem(key_path, key_var), _read_pem(cert_path, cert_var))
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=root)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self._stamps()
        if not stamp or stamp == self._stamp:
            return None
        try:
            config = self._load()
        except ConfigError as exc:  # half-written renewal: keep the old certificate, try at the next handshake
            log_event(log, "TLS certificate reload failed; keeping the current one", level=30, error=str(exc))
            return None
        self._stamp = stamp
        log_event(log, "TLS certificate reloaded")
        return config


def server_credentials(auth: ServiceAuthConfig) -> grpc.ServerCredentials:
    """TLS credentials of a server configured with ``auth`` (its cert and key; client certificates
    required and checked against the CA with RLHF_AUTH_TLS_CLIENT_AUTH), reloaded when renewed."""
    certs = _ReloadingCertificates(auth)
    return grpc.dynamic_ssl_server_credentials(certs.initial, certs, require_client_authentication=auth.tls_client_auth)


# --- the server ----------------------------------------------------------------------------------

DEFAULT_MAX_CONCURRENT_RPCS = 1024
"""Calls a server handles at once unless told (RLHF_<SERVICE>_GRPC_MAX_CONCURRENT_RPCS)."""
HEALTH_MAX_RPCS = 64
"""Calls the plaintext health-only server (RLHF_<SERVICE>_HEALTH_PORT) handles at once: probes."""
MAX_CONCURRENT = Gauge(
    "rlhf_grpc_max_concurrent_rpcs",
    "The bound on calls a gRPC server handles at once (beyond it: RESOURCE_EXHAUSTED)",
    ["service"],
)
IN_FLIGHT = Gauge("rlhf_grpc_rpcs_in_flight", "gRPC calls being handled, health checks included", ["service"])


def server_options(max_message_mb: int) -> list[tuple[str, int]]:
    """Channel arguments of a server: message size caps both ways, and no more than 8 KiB of
    metadata per call (gRPC's default, made explicit). The HTTP/2 streams of a connection are left
    unbounded on purpose: a per-connection bound makes calls past it wait at the client, while the
    server's ``maximum_concurrent_rpcs`` refuses them at once (the gateway multiplexes everything
    over one connection)."""
    return [
        ("grpc.max_receive_message_length", max_message_mb << 20),
        ("grpc.max_send_message_length", max_message_mb << 20),
        ("grpc.max_metadata_size", 8 << 10),
    ]


class InFlightInterceptor(grpc.aio.ServerInterceptor):
    """Counts the calls being handled (``rlhf_grpc_rpcs_in_flight{service}``), from the first
    interceptor to the end of the response; what the bound above is compared against."""

    def __init__(self, service_name: str):
        self.gauge = IN_FLIGHT.labels(service_name)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        gauge = self.gauge
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                gauge.inc()
                try:
                    return await inner(request, context)
                finally:
                    gauge.dec()

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream and inspect.iscoroutinefunction(handler.unary_stream):
            inner_writer = handler.unary_stream

            async def unary_stream_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                gauge.inc()
                try:
                    await inner_writer(request, context)
                finally:
                    gauge.dec()

            return handler._replace(unary_stream=unary_stream_writer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                gauge.inc()
                try:
                    async for item in inner_stream(request, context):
                        yield item
                finally:
                    gauge.dec()

            return handler._replace(unary_stream=unary_stream)
        return handler


class GrpcServer:
    """A grpc.aio server with caller authentication, health checking, the error interceptor, TLS
    and signal handling.

    ``auth`` says which credentials are accepted (and the TLS files); ``access`` which callers may use
    each RPC. Without accepted credentials every call but health is refused. ``health_port`` (not 0)
    adds a plaintext server that answers only grpc.health.v1, for probes that cannot speak TLS.
    """

    def __init__(
        self,
        service_name: str,
        host: str,
        port: int,
        *,
        auth: ServiceAuthConfig,
        access: Sequence[RpcAccess],
        grace_period_s: float = 10.0,
        max_message_mb: int = 64,
        health_port: int = 0,
        max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    ):
        self.service_name = service_name
        self.grace_period_s = grace_period_s
        self.max_concurrent_rpcs = max_concurrent_rpcs
        opts = server_options(max_message_mb)
        accepted = auth.accepted_callers()
        if not accepted:
            log_event(
                log,
                "no accepted credentials (RLHF_AUTH_ACCEPT, RLHF_AUTH_ACCEPT_FILE): every call but health is refused",
                level=30,
                service=service_name,
            )
        interceptors = [
            InFlightInterceptor(service_name),
            AuthInterceptor(service_name, accepted, access),
            ErrorMappingInterceptor(),
        ]
        # grpc.aio runs every handler on this process's event loop (no thread pool: the servicers
        # are coroutines), so the one queue to bound is the calls admitted: maximum_concurrent_rpcs.
        self.server = grpc.aio.server(
            interceptors=interceptors, options=opts, maximum_concurrent_rpcs=max_concurrent_rpcs
        )
        MAX_CONCURRENT.labels(service_name).set(max_concurrent_rpcs)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.tls = auth.tls_server
        if self.tls:
            self.port = self.server.add_secure_port(f"{host}:{port}", server_credentials(auth))
        else:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {host}:{port}")
        self.address = f"{host}:{self.port}"
        self.health_server: grpc.aio.Server | None = None
        self.health_address = ""
        if health_port:
            self.health_server = grpc.aio.server(options=server_options(1), maximum_concurrent_rpcs=HEALTH_MAX_RPCS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            bound = self.health_server.add_insecure_port(f"{host}:{health_port}")
            if bound == 0:
                raise OSError(f"cannot bind the health server to {host}:{health_port}")
            self.health_address = f"{host}:{bound}"
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Start listening; health reports NOT_SERVING until ``set_serving``."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        log_event(
            log,
            "gRPC server listening",
            service=self.service_name,
            address=self.address,
            tls=self.tls,
            health=self.health_address or None,
        )

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
        if self.health_server is not None:
            await self.health_server.stop(0)
        log_event(log, "stopped", service=self.service_name)
