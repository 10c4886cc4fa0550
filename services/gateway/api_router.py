"""HTTP routes of the gateway: each route only converts between HTTP and the serving classes."""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway import metrics
from services.gateway.config import GatewayConfig
from services.gateway.errors import error_response, install_error_handlers, response_for
from services.gateway.feedback_serving import FeedbackClient, FeedbackForwarding
from services.gateway.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    ModelList,
)
from services.gateway.serving import ChatServing, FeedbackTokens, InferenceClient

STATIC = Path(__file__).parent / "static"


class BodyTooLarge(Exception):
    """A request body past the gateway's limit."""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when the client went away first.

    Raises BodyTooLarge past ``limit`` bytes: at once for a declared Content-Length over it, for a
    chunked body as soon as it passes it (the rest is never read).
    """
    declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: the body came in one message
        if len(body) > limit:
            raise BodyTooLarge
        return body
    chunks = bytearray(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks += message.get("body", b"")
        if len(chunks) > limit:
            raise BodyTooLarge
        if not message.get("more_body", False):
            return bytes(chunks)


async def body_or_refusal(scope: Scope, receive: Receive, send: Send, limit: int) -> bytes | None:
    """The request body; None when the request is over already: the client went away, or the body
    was over ``limit`` and has been answered with 413."""
    try:
        return await read_body(scope, receive, limit)
    except BodyTooLarge:
        metrics.REQUESTS.labels("other", "413").inc()
        response = error_response(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        await response(scope, receive, send)
        return None


def refuse_unauthorised(scope: Scope, api_keys: tuple[str, ...]) -> JSONResponse | None:
    """The 401 for a /v1/ request without a valid key (when keys are configured); else None."""
    if api_keys and scope["path"].startswith("/v1/") and not _authorised(scope, api_keys):
        return error_response(401, "missing or invalid API key (Authorization: Bearer ...)", code="invalid_api_key")
    return None


def observe(route: str, status: int, started: float) -> None:
    metrics.REQUESTS.labels(route, str(status)).inc()
    metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)


class BodySizeLimit:
    """Refuse bodies over ``limit`` bytes with 413 (pure ASGI middleware), before the app sees them."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = await body_or_refusal(scope, receive, send, self.limit)
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then wait for the disconnect, as streaming responses expect

        await self.app(scope, replay, send)


class AuthAndMetrics:
    """Bearer-token check on /v1/ routes and request metrics (pure ASGI middleware).

    Pure ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs every
    request through an extra task group and memory streams, which cost more CPU than a whole
    rating's route did.
    """

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]):
        self.app = app
        self.api_keys = api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path.startswith("/v1/") else "other"
        started = time.perf_counter()
        refusal = refuse_unauthorised(scope, self.api_keys)
        if refusal is not None:
            await refusal(scope, receive, send)
            observe(route, 401, started)
            return
        status = 500

        async def send_and_observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                observe(route, status, started)  # to the last byte, for streams too

        try:
            await self.app(scope, receive, send_and_observe)
        except Exception:
            observe(route, 500, started)
            raise


class Gateway:
    """The gateway's ASGI app: POST /v1/feedback served here, everything else by the FastAPI app.

    A rating is small and ratings come in thousands a second: FastAPI's routing, its exception and
    size/auth/metrics middlewares cost more CPU than the rating's own work. This path does the same
    steps in the same order (413 for an oversized body, 401 without a valid key, the request
    metrics) with the same helpers, and the same error responses (errors.response_for). The route
    is still declared on the FastAPI app, for the OpenAPI schema.
    """

    def __init__(self, api: FastAPI, feedback: FeedbackForwarding, cfg: GatewayConfig):
        self.api = api
        """The FastAPI app: every other route, the lifespan, and the OpenAPI schema."""
        self.feedback = feedback
        self.limit = cfg.max_body_bytes
        self.api_keys = cfg.api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/feedback" or scope["method"] != "POST":
            return await self.api(scope, receive, send)
        started = time.perf_counter()
        body = await body_or_refusal(scope, receive, send, self.limit)
        if body is None:
            return
        refusal = refuse_unauthorised(scope, self.api_keys)
        if refusal is not None:
            await refusal(scope, receive, send)
            return observe("/v1/feedback", 401, started)
        key = next((v for k, v in scope["headers"] if k == b"idempotency-key"), None)
        try:
            reply = await self.feedback.submit(body, key.decode("latin-1") if key is not None else None)
        except Exception as exc:  # noqa: BLE001 - every error becomes its response, as in the app
            response = response_for(exc, "/v1/feedback")
            await response(scope, receive, send)
            return observe("/v1/feedback", response.status_code, started)
        content = reply.model_dump_json().encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": content})
        observe("/v1/feedback", 200, started)


def create_app(cfg: GatewayConfig) -> Gateway:
    """The gateway's ASGI app, calling the inference service at cfg.inference_address and the
    feedback service at cfg.feedback_address."""
    chat = ChatServing(FeedbackTokens(cfg.token))
    feedback = FeedbackForwarding()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # gRPC aio channels belong to the loop that creates them: the server's.
        client = InferenceClient(cfg.inference_address, cfg.request_timeout_s)
        chat.attach(client)
        feedback_client = FeedbackClient(cfg.feedback_address) if cfg.feedback_address else None
        feedback.attach(feedback_client)
        yield
        await client.close()
        if feedback_client:
            await feedback_client.close()

    app = FastAPI(title="RLHF Flywheel gateway", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    install_error_handlers(app)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    async def chat_completions(body: ChatCompletionRequest):
        if body.stream:
            events = await chat.stream(body)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        return await chat.complete(body)

    @app.post(
        "/v1/feedback",
        response_model=FeedbackResponse,
        openapi_extra={
            "requestBody": {"content": {"application/json": {"schema": FeedbackRequest.model_json_schema()}}}
        },
        responses={400: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    async def submit_feedback(request: Request):
        # Served by Gateway before FastAPI routes anything; declared here for the API schema.
        # The raw body, not a parsed model: a body that does not parse still goes to the dead-letter topic.
        reply = await feedback.submit(await request.body(), request.headers.get("idempotency-key"))
        return Response(reply.model_dump_json(), media_type="application/json")

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return await chat.models()

    @app.get("/healthz")
    async def healthz():
        ok = await chat.healthy()
        return JSONResponse({"status": "ok" if ok else "inference unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse((STATIC / "chat.html").read_text())

    # Added last, so it runs first: the size limit applies before authentication and metrics.
    app.add_middleware(AuthAndMetrics, api_keys=cfg.api_keys)
    app.add_middleware(BodySizeLimit, limit=cfg.max_body_bytes)
    return Gateway(app, feedback, cfg)


def _authorised(scope: Scope, keys: tuple[str, ...]) -> bool:
    header = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip(), k) for k in keys)
