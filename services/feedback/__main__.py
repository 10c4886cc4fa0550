"""`python -m services.feedback`: run the feedback service until SIGTERM."""

from __future__ import annotations

import asyncio

from services.feedback.app import FeedbackApp
from services.feedback.config import FeedbackConfig
from shared.config import load_config
from shared.logging import setup_logging
from shared.metrics import start_metrics_server


async def run(cfg: FeedbackConfig) -> None:
    app = FeedbackApp(cfg)
    app.server.install_signal_handlers()
    await app.start()
    await app.server.wait_for_stop_request()
    await app.stop()


def main() -> None:
    cfg = load_config(FeedbackConfig)
    setup_logging("feedback", cfg.log)
    start_metrics_server(cfg.host, cfg.metrics_port)
    asyncio.run(run(cfg))


if __name__ == "__main__":
    main()
