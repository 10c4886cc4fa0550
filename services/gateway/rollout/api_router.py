"""HTTP routes of the rollout view: the /flywheel page and GET /v1/flywheel, the JSON it polls.

The page itself is static and public, like the chat page; its data is under /v1/, so it needs what
every /v1/ route needs (an API key or a session: the page logs in as the chat page does).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from services.gateway.errors import ErrorResponse
from services.gateway.rollout.board import FlywheelBoard
from services.gateway.rollout.live import LiveStatus
from services.gateway.rollout.routing import Router
from services.gateway.rollout.schema import FlywheelView

STATIC = Path(__file__).resolve().parents[1] / "static"


def flywheel_router(
    board: FlywheelBoard, router: Router, following: Callable[[], bool], live: Callable[[], LiveStatus | None]
) -> APIRouter:
    """The rollout view's routes: the figures of ``board`` (and of ``live()``, the rollout service's
    Status, when there is one), the shares of ``router``; ``following`` says whether the gateway
    follows rlhf.rollout."""
    api = APIRouter()

    @api.get("/v1/flywheel", response_model=FlywheelView, responses={401: {"model": ErrorResponse}})
    async def flywheel_state() -> FlywheelView:
        status = live()
        figures = await status.figures() if status is not None else None
        return board.view(router, following=following(), live=figures)

    @api.get("/flywheel", response_class=HTMLResponse)
    async def flywheel_page() -> HTMLResponse:
        return HTMLResponse((STATIC / "flywheel.html").read_text())

    return api
