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
from services.gateway.errors import error_response, install_error_handlers
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


class BodySizeLimit:
    """Refuse bodies over ``limit`` bytes with 413 (pure ASGI middleware).

    The body is read up to the limit before the app sees it: a declared Content-Length over the
    limit is refused at once, a chunked body as soon as it passes the limit.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then wait for the disconnect, as streaming responses expect

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.REQUESTS.labels("other", "413").inc()
        response = error_response(413, f"the request body is larger than {self.limit} bytes",
                                  code="request_too_large")
        await response(scope, receive, send)


def create_app(cfg: GatewayConfig) -> FastAPI:
    """The gateway's FastAPI app, calling the inference service at cfg.inference_address."""
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

    @app.middleware("http")
    async def auth_and_metrics(request: Request, call_next):
        route = request.url.path
        started = time.perf_counter()
        if cfg.api_keys and route.startswith("/v1/") and not _authorised(request, cfg.api_keys):
            response = error_response(401, "missing or invalid API key (Authorization: Bearer ...)",
                                      code="invalid_api_key")
        else:
            response = await call_next(request)
        metrics.REQUESTS.labels(route if route.startswith("/v1/") else "other", str(response.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(route if route.startswith("/v1/") else "other").observe(
            time.perf_counter() - started)
        return response

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def chat_completions(body: ChatCompletionRequest):
        if body.stream:
            events = await chat.stream(body)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await chat.complete(body)

    @app.post("/v1/feedback", response_model=FeedbackResponse,
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": FeedbackRequest.model_json_schema()}}}},
              responses={400: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def submit_feedback(request: Request):
        # The raw body, not a parsed model: a body that does not parse still goes to the dead-letter topic.
        return await feedback.submit(await request.body(), request.headers.get("idempotency-key"))

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

    app.add_middleware(BodySizeLimit, limit=cfg.max_body_bytes)
    return app


def _authorised(request: Request, keys: tuple[str, ...]) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip(), k) for k in keys)
