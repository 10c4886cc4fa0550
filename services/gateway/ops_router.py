"""HTTP routes for operators: GET /healthz (503 while the inference service is down) and GET /metrics
(unless RLHF_GATEWAY_METRICS_ON_API_PORT=0: then only on the metrics port, `__main__`)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway.chat.serving import ChatServing


def ops_router(chat: ChatServing, metrics_on_api_port: bool = True) -> APIRouter:
    """The health route, and the metrics route when ``metrics_on_api_port``; ``chat`` reports the
    inference service's health."""
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        ok = await chat.healthy()
        return JSONResponse({"status": "ok" if ok else "inference unavailable"}, status_code=200 if ok else 503)

    if metrics_on_api_port:

        @router.get("/metrics")
        async def prometheus_metrics() -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router
