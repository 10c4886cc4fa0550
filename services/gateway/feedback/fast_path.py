"""POST /v1/feedback over HTTP: served by FeedbackFastPath, an ASGI app in front of the FastAPI app,
and documented in the FastAPI app's OpenAPI schema by document_feedback_route.

There is deliberately no FastAPI route for POST /v1/feedback: a handler that never runs would still
look like the place where ratings are served.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.models import OpenAPI
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema
from starlette.types import Receive, Scope, Send

from services.gateway.config import GatewayConfig
from services.gateway.errors import ErrorResponse, response_for
from services.gateway.feedback.schema import FeedbackRequest, FeedbackResponse
from services.gateway.feedback.serving import FeedbackForwarding
from services.gateway.middleware import Gatekeeper, body_or_refusal, observe, with_cookie

FEEDBACK_ROUTE = "/v1/feedback"


class FeedbackFastPath:
    """The gateway's outer ASGI app: POST /v1/feedback served here, everything else by the FastAPI app.

    A rating is small and ratings come in thousands a second: FastAPI's routing, its exception and
    size/auth/metrics middlewares cost more CPU than the rating's own work. This path does the same
    steps in the same order (413 for an oversized body, 401 without a valid key or session, 429
    over the caller's feedback rate limit, the request metrics) with the same helpers
    (middleware.py), and the same error responses (errors.response_for). FastAPI has no route for
    it; document_feedback_route puts it in the OpenAPI schema.
    """

    def __init__(self, api: FastAPI, feedback: FeedbackForwarding, cfg: GatewayConfig, gatekeeper: Gatekeeper):
        self.api = api
        """The FastAPI app: every other route, the lifespan, and the OpenAPI schema."""
        self.feedback = feedback
        self.limit = cfg.max_body_bytes
        self.body_timeout_s = cfg.body_timeout_s
        self.gatekeeper = gatekeeper

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != FEEDBACK_ROUTE or scope["method"] != "POST":
            return await self.api(scope, receive, send)
        started = time.perf_counter()
        body = await body_or_refusal(scope, receive, send, self.limit, FEEDBACK_ROUTE, self.body_timeout_s)
        if body is None:
            return
        caller = self.gatekeeper.admit(scope, self.gatekeeper.feedback)
        if isinstance(caller, JSONResponse):
            await caller(scope, receive, send)
            return observe(FEEDBACK_ROUTE, caller.status_code, started)
        key = next((v for k, v in scope["headers"] if k == b"idempotency-key"), None)
        try:
            reply = await self.feedback.submit(
                body, key.decode("latin-1") if key is not None else None, caller.principal
            )
        except Exception as exc:  # noqa: BLE001 - every error becomes its response, as in the app
            response = with_cookie(response_for(exc, FEEDBACK_ROUTE), caller)
            await response(scope, receive, send)
            return observe(FEEDBACK_ROUTE, response.status_code, started)
        content = reply.model_dump_json().encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        if caller.set_cookie is not None:
            headers.append((b"set-cookie", caller.set_cookie))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        observe(FEEDBACK_ROUTE, 200, started)


def document_feedback_route(app: FastAPI) -> None:
    """Make ``app.openapi()`` (/openapi.json, /docs) document POST /v1/feedback, which FastAPI does
    not serve: the operation is built from FeedbackRequest, FeedbackResponse and ErrorResponse, the
    models FeedbackFastPath and FeedbackForwarding answer with, in the form FastAPI gives its routes."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()  # FastAPI's schema of its own routes
            operation, components = _feedback_operation()
            schema["paths"][FEEDBACK_ROUTE] = {"post": operation}
            for name, model_schema in components.items():
                schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(name, model_schema)
            # Checked and written out as FastAPI writes its own (get_openapi): null fields left out.
            app.openapi_schema = jsonable_encoder(OpenAPI(**schema), by_alias=True, exclude_none=True)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema


def _feedback_operation() -> tuple[dict[str, Any], dict[str, Any]]:
    """The POST operation of /v1/feedback and the component schemas it refers to."""
    refs, top = models_json_schema(
        [(FeedbackResponse, "serialization"), (ErrorResponse, "serialization")],
        ref_template="#/components/schemas/{model}",
    )

    def answer(status: int, model: type) -> dict[str, Any]:
        description = "Successful Response" if status == 200 else HTTPStatus(status).phrase
        return {
            "description": description,
            "content": {"application/json": {"schema": refs[(model, "serialization")]}},
        }

    operation = {
        "summary": "Submit Feedback",
        "operationId": "submit_feedback_v1_feedback_post",
        # The request's schema inline (not a component), as the gateway has always published it.
        "requestBody": {"content": {"application/json": {"schema": FeedbackRequest.model_json_schema()}}},
        "responses": {
            "200": answer(200, FeedbackResponse),
            **{str(status): answer(status, ErrorResponse) for status in (400, 401, 403, 429, 503)},
        },
    }
    return operation, top.get("$defs", {})
