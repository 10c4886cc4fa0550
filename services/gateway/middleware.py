"""The gateway's pure-ASGI middleware, and the helpers the feedback fast path shares with it.

On every route, in this order: a body over the size limit gets 413 before anything else, one that
does not arrive in time 408 (BodySizeLimit); then a /v1/ request is admitted by the Gatekeeper: who is asking (401 without a
valid key or session; identity.py), and the caller's rate limit on chat completions (429 with
Retry-After; rate_limit.py); every request's status and duration go to the metrics
(AuthAndMetrics), labelled by the template of the route that serves the path (RouteLabels), so
that no client can add a series by inventing paths. The feedback fast path (feedback/fast_path.py) runs the same steps in the same
order with the same helpers: body_or_refusal, Gatekeeper.admit (with the feedback limit), observe.
"""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway import metrics
from services.gateway.errors import error_response
from services.gateway.identity import Authenticator, Caller
from services.gateway.rate_limit import TokenBuckets, retry_after_header
from shared.errors import Unauthenticated

PRINCIPAL = "rlhf.principal"
"""The scope key under which an admitted request carries its Caller, for the routes."""
DOCS_PATHS = frozenset({"/docs", "/openapi.json", "/docs/oauth2-redirect"})
OPEN_SESSION_CALLS = frozenset({("POST", "/v1/session"), ("DELETE", "/v1/session")})
"""Logging in and out need no principal (the rest of /v1/ does)."""
CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
GENERATION_ROUTES = frozenset({CHAT_ROUTE, COMPLETIONS_ROUTE})
"""The routes that take from the caller's chat rate limit (POST)."""
UNMATCHED = "unmatched"
"""The metrics label of every request no route serves, whatever its path."""


class RouteLabels:
    """The metrics label of a request: the path template of the route that serves it.

    ``routes`` is the app's list of routes (read at each call, so routes added after this is made
    count). A route whose path matches but not its method (405) still names the template; a path
    no route matches is UNMATCHED. The number of labels is the number of routes plus one.
    """

    def __init__(self, routes: list[BaseRoute]):
        self.routes = routes

    def __call__(self, scope: Scope) -> str:
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", UNMATCHED))
            if match is Match.PARTIAL and partial is None:
                partial = str(getattr(route, "path", UNMATCHED))
        return partial or UNMATCHED


class BodyTooLarge(Exception):
    """A request body past the gateway's limit."""


class BodyTimeout(Exception):
    """A request body that did not arrive within the gateway's body timeout."""


async def read_body(scope: Scope, receive: Receive, limit: int, timeout_s: float | None = None) -> bytes | None:
    """The whole request body, or None when the client went away first.

    Raises BodyTooLarge past ``limit`` bytes: at once for a declared Content-Length over it, for a
    chunked body as soon as it passes it (the rest is never read). Raises BodyTimeout when the
    whole body has not arrived ``timeout_s`` seconds after the call (None: no limit).
    """
    declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(receive, limit)
    except TimeoutError:
        raise BodyTimeout from None


async def _read(receive: Receive, limit: int) -> bytes | None:
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


async def body_or_refusal(
    scope: Scope, receive: Receive, send: Send, limit: int, route: str, timeout_s: float | None = None
) -> bytes | None:
    """The request body; None when the request is over already: the client went away, or the body
    was over ``limit`` (answered 413) or late (not all there ``timeout_s`` after the request head:
    answered 408). Both refusals close the connection (the rest of the body is never read) and are
    counted under ``route``."""
    try:
        return await read_body(scope, receive, limit, timeout_s)
    except BodyTooLarge:
        status, message, code = 413, f"the request body is larger than {limit} bytes", "request_too_large"
    except BodyTimeout:
        metrics.BODY_TIMEOUTS.inc()
        status, message, code = 408, f"the request body did not arrive within {timeout_s:g} s", "request_timeout"
    metrics.REQUESTS.labels(route, str(status)).inc()
    response = error_response(status, message, code=code, headers={"Connection": "close"})
    await response(scope, receive, send)
    return None


class Gatekeeper:
    """Admits a request for a principal, or answers it with the refusal: 401 (unknown caller,
    identity.Authenticator), 401 for the API docs without a key (when keys are configured and the
    docs are not public), 429 over the caller's rate limit (with Retry-After)."""

    def __init__(self, authenticator: Authenticator, chat: TokenBuckets, feedback: TokenBuckets, docs_need_key: bool):
        self.authenticator = authenticator
        self.chat = chat
        self.feedback = feedback
        self.docs_need_key = docs_need_key

    def guards(self, method: str, path: str) -> bool:
        """Whether a request needs a principal: /v1/ except logging in and out; the docs when keys
        are configured and they are not public."""
        if path.startswith("/v1/"):
            return (method, path) not in OPEN_SESSION_CALLS
        return self.docs_need_key and path in DOCS_PATHS

    def admit(self, scope: Scope, limit: TokenBuckets | None) -> Caller | JSONResponse:
        """The caller, or the response refusing the request. ``limit``: the rate limit to take from."""
        try:
            caller = self.authenticator.authenticate(scope["headers"], scope.get("scheme", "http"))
        except Unauthenticated as exc:
            return error_response(401, exc.message, code="invalid_api_key")
        if caller.anonymous and scope["path"] in DOCS_PATHS:
            return with_cookie(
                error_response(401, "the API docs need an API key (Authorization: Bearer ...)", code="invalid_api_key"),
                caller,
            )
        if limit is not None:
            wait_s = limit.take(caller.principal)
            if wait_s:
                return with_cookie(rate_limited(limit, wait_s), caller)
        return caller


def rate_limited(limit: TokenBuckets, wait_s: float) -> JSONResponse:
    """The 429 of a request over ``limit``, in OpenAI's error shape, with Retry-After."""
    retry_after = retry_after_header(wait_s)
    return error_response(
        429,
        f"rate limit reached for {limit.name}: at most {limit.rate_per_s * 60:g} per minute and "
        f"{limit.burst:g} at once per principal; retry after {retry_after} s",
        type_="rate_limit_exceeded",
        code="rate_limit_exceeded",
        headers={"Retry-After": retry_after},
    )


def with_cookie(response: JSONResponse, caller: Caller) -> JSONResponse:
    """``response`` with the caller's new session cookie, if it has one."""
    if caller.set_cookie is not None:
        response.raw_headers.append((b"set-cookie", caller.set_cookie))
    return response


def observe(route: str, status: int, started: float) -> None:
    """Count a finished request in the metrics: its route, status, and seconds since ``started``."""
    metrics.REQUESTS.labels(route, str(status)).inc()
    metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)


class BodySizeLimit:
    """Refuse bodies over ``limit`` bytes with 413, and bodies not there within ``timeout_s`` with
    408 (pure ASGI middleware), before the app sees them; ``labels`` names the route in the metrics."""

    def __init__(self, app: ASGIApp, limit: int, labels: RouteLabels, timeout_s: float | None = None):
        self.app = app
        self.limit = limit
        self.labels = labels
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = await body_or_refusal(scope, receive, send, self.limit, self.labels(scope), self.timeout_s)
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
    """Admission (Gatekeeper: 401, 429) on /v1/ routes and request metrics (pure ASGI middleware).

    An admitted request carries its Caller in ``scope[PRINCIPAL]``; a new anonymous session's
    cookie is added to the response. Pure ASGI rather than ``@app.middleware("http")``:
    Starlette's BaseHTTPMiddleware runs every request through an extra task group and memory
    streams, which cost more CPU than a whole rating's route did.
    """

    def __init__(self, app: ASGIApp, gatekeeper: Gatekeeper, labels: RouteLabels):
        self.app = app
        self.gatekeeper = gatekeeper
        self.labels = labels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = self.labels(scope)  # the template, never the raw path (bounded label values)
        started = time.perf_counter()
        cookie = None
        if self.gatekeeper.guards(scope["method"], path):
            limit = self.gatekeeper.chat if path in GENERATION_ROUTES and scope["method"] == "POST" else None
            admitted = self.gatekeeper.admit(scope, limit)
            if isinstance(admitted, JSONResponse):
                await admitted(scope, receive, send)
                observe(route, admitted.status_code, started)
                return
            scope[PRINCIPAL] = admitted
            cookie = admitted.set_cookie
        status = 500

        async def send_and_observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if cookie is not None:
                    message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie)]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                observe(route, status, started)  # to the last byte, for streams too

        try:
            await self.app(scope, receive, send_and_observe)
        except Exception:
            observe(route, 500, started)
            raise
