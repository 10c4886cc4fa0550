"""The gateway's app factory: ``create_app(cfg)`` is the ASGI app that `python -m services.gateway` serves.

Requests pass through, outermost first:

1. FeedbackFastPath (feedback/fast_path.py): serves POST /v1/feedback itself, passes the rest on;
2. BodySizeLimit, AuthAndMetrics (middleware.py): 413; who is asking (401, identity.py) and the
   chat rate limit (429, rate_limit.py); metrics;
3. the FastAPI app: the chat routes (chat/api_router.py), the session routes (session_router.py)
   and the ops routes (ops_router.py), with errors answered by errors.py.
"""

from __future__ import annotations

import logging
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
from services.gateway.identity import Authenticator, SessionCodec, load_keyring, session_secret
from services.gateway.middleware import AuthAndMetrics, BodySizeLimit, Gatekeeper
from services.gateway.ops_router import ops_router
from services.gateway.rate_limit import TokenBuckets
from services.gateway.session_router import session_router
from shared.grpc_channels import ClientCredentials
from shared.logging import get_logger, log_event

log = get_logger(__name__)


def gatekeeper_of(cfg: GatewayConfig) -> Gatekeeper:
    """Identity (keys, sessions, anonymous mode) and the per-principal rate limits of ``cfg``."""
    keys = load_keyring(cfg.api_keys, cfg.api_keys_file)
    secret, secret_source = session_secret(cfg.session_secret, cfg.token.secret)
    authenticator = Authenticator(keys, SessionCodec(secret, cfg.session_ttl_s), cfg.anonymous)
    log_event(
        log,
        "identity",
        principals_with_keys=len(keys),
        anonymous=cfg.anonymous,
        session_secret=secret_source,
        public_docs=cfg.public_docs or not keys,
    )
    if not keys and not cfg.anonymous:
        log_event(
            log,
            "no API keys and anonymous mode off: every /v1/ request will be refused (401)",
            level=logging.WARNING,
        )
    return Gatekeeper(
        authenticator,
        TokenBuckets("chat", cfg.chat_rate_per_min, cfg.chat_burst, cfg.rate_limit_principals),
        TokenBuckets("feedback", cfg.feedback_rate_per_min, cfg.feedback_burst, cfg.rate_limit_principals),
        docs_need_key=bool(keys) and not cfg.public_docs,
    )


def create_app(cfg: GatewayConfig) -> FeedbackFastPath:
    """The gateway's ASGI app, calling the inference service at cfg.inference_address and the
    feedback service at cfg.feedback_address."""
    chat = ChatServing(FeedbackTokens(cfg.token))
    feedback = FeedbackForwarding()
    gatekeeper = gatekeeper_of(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # gRPC aio channels belong to the loop that creates them: the server's.
        credentials = ClientCredentials.of_service(cfg.auth)
        client = InferenceClient(cfg.inference_address, cfg.request_timeout_s, credentials)
        chat.attach(client)
        feedback_client = FeedbackClient(cfg.feedback_address, credentials) if cfg.feedback_address else None
        feedback.attach(feedback_client)
        yield
        await client.close()
        if feedback_client:
            await feedback_client.close()

    app = FastAPI(title="RLHF Flywheel gateway", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    install_error_handlers(app)
    app.include_router(chat_router(chat))
    app.include_router(session_router(gatekeeper.authenticator))
    app.include_router(ops_router(chat, metrics_on_api_port=cfg.metrics_on_api_port))
    document_feedback_route(app)

    # Added last, so it runs first: the size limit applies before authentication and metrics.
    app.add_middleware(AuthAndMetrics, gatekeeper=gatekeeper)
    app.add_middleware(BodySizeLimit, limit=cfg.max_body_bytes)
    return FeedbackFastPath(app, feedback, cfg, gatekeeper)
