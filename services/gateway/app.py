"""The gateway's app factory: ``create_app(cfg)`` is the ASGI app that `python -m services.gateway` serves.

Requests pass through, outermost first:

1. FeedbackFastPath (feedback/fast_path.py): serves POST /v1/feedback itself, passes the rest on;
2. BodySizeLimit, AuthAndMetrics (middleware.py): 413, 401, metrics;
3. the FastAPI app: the chat routes (chat/api_router.py) and the ops routes (ops_router.py), with
   errors answered by errors.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.gateway.chat.api_router import chat_router
from services.gateway.chat.serving import ChatServing, FeedbackTokens, InferenceClient
from services.gateway.config import GatewayConfig
from services.gateway.errors import install_error_handlers
from services.gateway.feedback.batcher import FeedbackClient
from services.gateway.feedback.fast_path import FeedbackFastPath, document_feedback_route
from services.gateway.feedback.serving import FeedbackForwarding
from services.gateway.middleware import AuthAndMetrics, BodySizeLimit
from services.gateway.ops_router import ops_router


def create_app(cfg: GatewayConfig) -> FeedbackFastPath:
    """The gateway's ASGI app, calling the inference service at cfg.inference_address and the
    feedback service at cfg.feedback_address."""
    chat = ChatServing(FeedbackTokens(cfg.token))
    feedback = FeedbackForwarding()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
    app.include_router(chat_router(chat))
    app.include_router(ops_router(chat))
    document_feedback_route(app)

    # Added last, so it runs first: the size limit applies before authentication and metrics.
    app.add_middleware(AuthAndMetrics, api_keys=cfg.api_keys)
    app.add_middleware(BodySizeLimit, limit=cfg.max_body_bytes)
    return FeedbackFastPath(app, feedback, cfg)
