"""The gateway's app factory: ``create_app(cfg)`` is the ASGI app that `python -m services.gateway` serves.

Requests pass through, outermost first (after uvicorn, which `__main__` runs with the guarded
protocol of uvicorn_single_write.py: the request head's time and size bounds, and a concurrency
limit):

1. FeedbackFastPath (feedback/fast_path.py): serves POST /v1/feedback itself, passes the rest on;
2. BodySizeLimit, AuthAndMetrics (middleware.py): 413 (too large), 408 (too slow); who is asking
   (401, identity.py) and the chat rate limit (429, rate_limit.py); metrics by route template;
3. the FastAPI app: the chat routes (chat/api_router.py), the session routes (session_router.py),
   the rollout view (rollout/api_router.py: /flywheel) and the ops routes (ops_router.py), with
   errors answered by errors.py.

With Kafka configured the gateway follows rlhf.rollout (rollout/feed.py) for the routing between
the stable and the canary group of inference replicas (rollout/routing.py) and for /flywheel.
"""

from __future__ import annotations

import asyncio
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
from services.gateway.middleware import AuthAndMetrics, BodySizeLimit, Gatekeeper, RouteLabels
from services.gateway.ops_router import ops_router
from services.gateway.rate_limit import TokenBuckets
from services.gateway.rollout.api_router import flywheel_router
from services.gateway.rollout.board import FlywheelBoard
from services.gateway.rollout.feed import RolloutFeed
from services.gateway.rollout.live import LiveStatus
from services.gateway.rollout.routing import Router
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
    """The gateway's ASGI app, calling the inference service at cfg.inference_address (and its
    canary group at cfg.canary_inference_address) and the feedback service at cfg.feedback_address."""
    router = Router(canary_enabled=bool(cfg.canary_inference_address))
    board = FlywheelBoard(cfg.flywheel_events)
    feed = RolloutFeed(cfg.kafka, router, board) if cfg.kafka.servers else None
    chat = ChatServing(FeedbackTokens(cfg.token), router, side_by_side=cfg.side_by_side)
    feedback = FeedbackForwarding()
    gatekeeper = gatekeeper_of(cfg)
    live: list[LiveStatus] = []  # made in the server's loop, as every aio channel

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if feed is not None:
            feed.start()
            if not await asyncio.to_thread(feed.wait_caught_up, cfg.rollout_catch_up_s):
                log_event(
                    log,
                    "rlhf.rollout not read to its end yet: every request goes to the stable group until it is",
                    level=logging.WARNING,
                    waited_s=cfg.rollout_catch_up_s,
                )
        # gRPC aio channels belong to the loop that creates them: the server's.
        credentials = ClientCredentials.of_service(cfg.auth)
        client = InferenceClient(cfg.inference_address, cfg.request_timeout_s, credentials)
        canary = (
            InferenceClient(cfg.canary_inference_address, cfg.request_timeout_s, credentials)
            if cfg.canary_inference_address
            else None
        )
        chat.attach(client, canary)
        feedback_client = (
            FeedbackClient(cfg.feedback_address, credentials, max_waiting=cfg.feedback_queue_max)
            if cfg.feedback_address
            else None
        )
        feedback.attach(feedback_client)
        if cfg.rollout_address:
            live.append(LiveStatus(cfg.rollout_address, credentials))
        log_event(
            log,
            "routing",
            stable=cfg.inference_address,
            canary=cfg.canary_inference_address or None,
            follows_rollout=feed is not None,
            side_by_side=cfg.side_by_side,
        )
        yield
        if feed is not None:
            await asyncio.to_thread(feed.stop)
        await client.close()
        if canary is not None:
            await canary.close()
        for status in live:
            await status.close()
        if feedback_client:
            await feedback_client.close()

    app = FastAPI(title="RLHF Flywheel gateway", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    install_error_handlers(app)
    app.include_router(chat_router(chat))
    app.include_router(session_router(gatekeeper.authenticator))
    app.include_router(
        flywheel_router(board, router, lambda: feed is not None and feed.following, lambda: live[0] if live else None)
    )
    app.include_router(ops_router(chat, metrics_on_api_port=cfg.metrics_on_api_port))
    document_feedback_route(app)

    # Added last, so it runs first: the size limit applies before authentication and metrics.
    labels = RouteLabels(app.router.routes)
    app.add_middleware(AuthAndMetrics, gatekeeper=gatekeeper, labels=labels)
    app.add_middleware(BodySizeLimit, limit=cfg.max_body_bytes, labels=labels, timeout_s=cfg.body_timeout_s)
    return FeedbackFastPath(app, feedback, cfg, gatekeeper)
