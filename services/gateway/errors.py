"""Every gateway error becomes an OpenAI-shaped error response here, and only here.

{"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": null}}
"""

from __future__ import annotations

import json
import secrets

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway import metrics
from services.gateway.rate_limit import retry_after_header
from shared.errors import GRPC_TO_HTTP, PARAM_METADATA_KEY, ResourceExhausted, RlhfError
from shared.logging import get_logger

log = get_logger(__name__)


# The error body's models: the schema every route declares for its error statuses.
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


PASSED_ON = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
"""Upstream codes whose text is the service's own answer about the request (a shared.errors class:
which field is wrong, which limit was reached), passed on to the HTTP client. Any other code's text
(UNAVAILABLE with the addresses it failed to reach, UNKNOWN with an exception, INTERNAL, a deadline)
is about the system, not the request: the client gets a generic message and a request id, the
gateway's log the text."""

_GENERIC = {
    grpc.StatusCode.UNAVAILABLE: "the upstream service is unavailable; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the upstream service did not answer in time",
    grpc.StatusCode.CANCELLED: "the upstream call was cancelled",
    grpc.StatusCode.UNAUTHENTICATED: "the gateway could not authenticate to the upstream service",
}


def request_id() -> str:
    """A fresh id that ties an error answered to a client to its line in the gateway's log."""
    return "req-" + secrets.token_hex(8)


def public_message(code: grpc.StatusCode, details: str, rid: str) -> str:
    """What an HTTP client is told of an upstream failure with ``code`` and ``details``.

    The details themselves for the codes in PASSED_ON (the service's answer about the request);
    otherwise a generic sentence per code (``the upstream service failed`` by default) followed by
    ``(request id <rid>)``, never the details.
    """
    if code in PASSED_ON:
        return details or code.name.lower()
    return f"{_GENERIC.get(code, 'the upstream service failed')} (request id {rid})"


def upstream_message(code: grpc.StatusCode, details: str) -> str:
    """public_message for a fresh request id; logs the details under that id when they are withheld."""
    rid = request_id()
    message = public_message(code, details, rid)
    if code not in PASSED_ON:
        log.warning("upstream error %s (request id %s): %s", code.name, rid, details)
    return message


class UpstreamRefusal(RlhfError):
    """An upstream service's refusal reported inside its reply (an item of a batch) rather than as
    the call's status; answered exactly as that status would have been."""

    def __init__(self, grpc_code: int, message: str, param: str | None):
        code = _STATUS_BY_NUMBER.get(grpc_code, grpc.StatusCode.UNKNOWN)
        super().__init__(upstream_message(code, message), param=param)
        self.grpc_code = code
        self.http_status, self.openai_type = GRPC_TO_HTTP.get(code, (502, "server_error"))


_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def error_from_grpc(exc: grpc.aio.AioRpcError) -> tuple[int, ErrorBody]:
    """The HTTP status and error body for a failed call to an upstream service."""
    status, type_ = GRPC_TO_HTTP.get(exc.code(), (502, "server_error"))
    param = None
    for key, value in exc.trailing_metadata() or ():
        if key == PARAM_METADATA_KEY:
            param = value
    message = upstream_message(exc.code(), exc.details() or "")
    return status, ErrorBody(message=message, type=type_, param=param, code=exc.code().name.lower())


def sse_error(status: int, body: ErrorBody) -> str:
    """An error inside a stream whose 200 headers are already sent (as vLLM and OpenAI do)."""
    return f"data: {json.dumps({'error': {**body.model_dump(), 'status': status}})}\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    return f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_argument")

    @app.exception_handler(RlhfError)
    async def on_domain(request: Request, exc: RlhfError) -> JSONResponse:
        return response_for(exc, request.url.path)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def on_grpc(request: Request, exc: grpc.aio.AioRpcError) -> JSONResponse:
        return response_for(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        return response_for(exc, request.url.path)


def response_for(exc: Exception, path: str) -> JSONResponse:
    """The response for an error raised while serving ``path`` (for routes that bypass FastAPI's
    exception handlers, and for those handlers themselves)."""
    if isinstance(exc, ResourceExhausted):
        headers: dict[str, str] | None = {"Retry-After": retry_after_header(exc.retry_after_s)}
    else:
        headers = {"Retry-After": "1"} if getattr(exc, "http_status", None) in (429, 503) else None
    if isinstance(exc, RlhfError):
        return error_response(
            exc.http_status, exc.message, exc.openai_type, exc.param, code=exc.grpc_code.name.lower(), headers=headers
        )
    if isinstance(exc, grpc.aio.AioRpcError):
        status, body = error_from_grpc(exc)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return error_response(status, body.message, body.type, body.param, body.code, headers)
    rid = request_id()
    log.error("unhandled error on %s (request id %s)", path, rid, exc_info=exc)
    metrics.UNHANDLED.inc()
    return error_response(500, f"internal server error (request id {rid})", "server_error")
