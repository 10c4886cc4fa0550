"""HTTP routes of sessions: who am I (GET), log in with an API key (POST), log out (DELETE) /v1/session.

The chat page logs in here once and then authenticates by its cookie; API clients send their key
on every request instead. The work is identity.Authenticator's; these routes only convert.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from services.gateway.errors import ErrorResponse, error_response
from services.gateway.identity import Authenticator, Caller, cookie_header, is_secure
from services.gateway.middleware import PRINCIPAL
from shared.errors import Unauthenticated


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: str


class SessionInfo(BaseModel):
    object: Literal["session"] = "session"
    principal: str
    """Who this session's requests (and ratings) are served for."""
    anonymous: bool
    """True for an anonymous principal (anon:...), false for an API key's."""


def session_router(authenticator: Authenticator) -> APIRouter:
    router = APIRouter()
    unauthorised: dict[int | str, dict[str, Any]] = {401: {"model": ErrorResponse}}

    @router.get("/v1/session", response_model=SessionInfo, responses=unauthorised)
    async def who_am_i(request: Request) -> SessionInfo:
        caller: Caller = request.scope[PRINCIPAL]
        return SessionInfo(principal=caller.principal, anonymous=caller.anonymous)

    @router.post("/v1/session", response_model=SessionInfo, responses=unauthorised)
    async def log_in(body: LoginRequest, request: Request) -> JSONResponse:
        secure = is_secure(request.url.scheme, request.scope["headers"])
        try:
            caller, _ = authenticator.login(body.api_key, secure)
        except Unauthenticated as exc:
            return error_response(401, exc.message, param="api_key", code="invalid_api_key")
        response = JSONResponse(SessionInfo(principal=caller.principal, anonymous=False).model_dump())
        assert caller.set_cookie is not None  # login always opens a session
        response.raw_headers.append((b"set-cookie", caller.set_cookie))
        return response

    @router.delete("/v1/session", status_code=204)
    async def log_out(request: Request) -> Response:
        response = Response(status_code=204)
        secure = is_secure(request.url.scheme, request.scope["headers"])
        response.raw_headers.append((b"set-cookie", cookie_header("", 0, secure)))
        return response

    return router
