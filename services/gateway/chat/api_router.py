"""HTTP routes of chat: POST /v1/chat/completions, POST /v1/completions (the legacy API, served as
a chat completion), GET /v1/models and /v1/models/{model_id}, and the chat page at /.

Each route only converts between HTTP and ChatServing (serving.py).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from services.gateway.chat.schema import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    as_completion,
)
from services.gateway.chat.serving import ChatServing
from services.gateway.errors import ErrorResponse
from services.gateway.middleware import PRINCIPAL
from shared.errors import NotFound

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

    @router.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503)},
    )
    async def completions(body: CompletionRequest, request: Request) -> CompletionResponse:
        principal = request.scope[PRINCIPAL].principal
        return as_completion(await chat.complete(body.as_chat(), principal))

    @router.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return await chat.models()

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def get_model(model_id: str) -> ModelCard:
        for card in (await chat.models()).data:
            if card.id == model_id:
                return card
        raise NotFound(f"the model {model_id!r} does not exist", param="model")

    @router.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse((STATIC / "chat.html").read_text())

    return router
