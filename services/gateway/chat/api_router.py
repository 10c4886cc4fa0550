"""HTTP routes of chat: POST /v1/chat/completions, GET /v1/models, and the chat page at /.

Each route only converts between HTTP and ChatServing (serving.py).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, StreamingResponse

from services.gateway.chat.schema import ChatCompletionRequest, ChatCompletionResponse, ModelList
from services.gateway.chat.serving import ChatServing
from services.gateway.errors import ErrorResponse

STATIC = Path(__file__).resolve().parents[1] / "static"


def chat_router(chat: ChatServing) -> APIRouter:
    """The chat routes, served by ``chat``."""
    router = APIRouter()

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    async def chat_completions(body: ChatCompletionRequest) -> ChatCompletionResponse | StreamingResponse:
        if body.stream:
            events = await chat.stream(body)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        return await chat.complete(body)

    @router.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return await chat.models()

    @router.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse((STATIC / "chat.html").read_text())

    return router
