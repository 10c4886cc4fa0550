"""The gateway's pure-ASGI middleware, and the helpers the feedback fast path shares with it.

On every route, in this order: a body over the size limit gets 413 before anything else
(BodySizeLimit); then a /v1/ request without a valid key gets 401, and every request's status and
duration go to the metrics (AuthAndMetrics). The feedback fast path (feedback/fast_path.py) runs the
same steps in the same order with the same helpers: body_or_refusal, refuse_unauthorised, observe.
"""

from __future__ import annotations

import hmac
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway import metrics
from services.gateway.errors import error_response


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
    """Count a finished request in the metrics: its route, status, and seconds since ``started``."""
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


def _authorised(scope: Scope, keys: tuple[str, ...]) -> bool:
    header = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip(), k) for k in keys)
