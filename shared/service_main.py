"""The process entry of every gRPC service: config -> logging -> /metrics -> app -> SIGTERM -> drain.

    if __name__ == "__main__":
        run_service("feedback", FeedbackConfig, FeedbackApp)

An app is any object with ``server`` (a shared.grpc_server.GrpcServer), ``async start()`` (ends
with health SERVING) and ``async stop()`` (drains and releases everything).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from shared.config import ServiceConfig, load_config
from shared.logging import setup_logging
from shared.metrics import start_metrics_server


def run_service(name: str, config_cls: type[ServiceConfig], make_app: Callable[[Any], Any]) -> None:
    cfg = load_config(config_cls)
    lower_priority(cfg)
    setup_logging(name, cfg.log)
    start_metrics_server(cfg.host, cfg.metrics_port)
    asyncio.run(_serve(make_app, cfg))


def lower_priority(cfg: ServiceConfig) -> None:
    """Add ``cfg.cpu_nice`` to this process's niceness. Call it first: Linux keeps a niceness per
    thread, and a thread takes its creator's when it is created (the /metrics server, gRPC's and
    torch's threads all start later)."""
    if cfg.cpu_nice:
        os.nice(cfg.cpu_nice)


async def _serve(make_app: Callable[[Any], Any], cfg: ServiceConfig) -> None:
    app = make_app(cfg)  # inside the loop: gRPC aio servers belong to the loop that makes them
    app.server.install_signal_handlers()
    await app.start()
    await app.server.wait_for_stop_request()
    await app.stop()
