"""Domain errors and their mapping to gRPC status codes and HTTP statuses, in one place.

Service logic raises these; the gRPC interceptor (shared/grpc_server.py) and the gateway's error
handler (services/gateway) turn them into status codes. Nothing else decides a status code.
"""

from __future__ import annotations

import grpc


class RlhfError(Exception):
    """Base of every error a service reports to its caller."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
    openai_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        """The request field at fault, when there is one (OpenAI's error `param`)."""


class InvalidArgument(RlhfError):
    """The request is malformed or a value is out of range."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    openai_type = "invalid_request_error"


class NotFound(RlhfError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    openai_type = "invalid_request_error"


class Unauthenticated(RlhfError):
    """The caller did not say who it is, or not credibly (no key, a wrong key, a bad session)."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    openai_type = "invalid_request_error"


class PermissionDenied(RlhfError):
    """The caller may not do this (e.g. a forged or expired feedback token)."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    openai_type = "invalid_request_error"


class FailedPrecondition(RlhfError):
    """The request is valid but the system is not in a state to serve it."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409
    openai_type = "invalid_request_error"


class ResourceExhausted(RlhfError):
    """The caller is over a limit (e.g. its rate of requests); ``retry_after_s`` says when to retry."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    openai_type = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s
        """Seconds until a retry can succeed (HTTP Retry-After)."""


class Unavailable(RlhfError):
    """A dependency (engine loading, broker down) cannot serve now; retrying later may work."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    openai_type = "server_error"


# The status a gateway returns when an upstream gRPC call fails with a code.
GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
    grpc.StatusCode.CANCELLED: (499, "server_error"),
}

# Trailing-metadata key carrying RlhfError.param across gRPC.
PARAM_METADATA_KEY = "rlhf-error-param"
