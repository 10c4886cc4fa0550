"""HTTP routes of chat: POST /v1/chat/completions, GET /v1/models, and the chat page at /.

Each route only converts between HTTP and ChatServing (serving.py).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from services.gateway.chat.schema import ChatCompletionRequest, ChatCompletionResponse, ModelList
from services.gateway.chat.serving import ChatServing
from services.gateway.errors import ErrorResponse
from services.gateway.middleware import PRINCIPAL

STATIC = Path(__file__).resolve().parents[1] / "static"


def chat_router(chat: ChatServing) -> APIRouter:
    """The chat routes, served by ``chat``."""
    router = APIRouter()

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503)},
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> ChatCompletionResponse | StreamingResponse:
        principal = request.scope[PRINCIPAL].principal  # admitted by the Gatekeeper (middleware.py)
        if body.stream:
            events = await chat.stream(body, principal)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        return await chat.complete(body, principal)

    @router.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return await chat.models()

    @router.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse((STATIC / "chat.html").read_text())

    return router
