"""`python -m services.inference`: run the inference service until SIGTERM."""

from __future__ import annotations

import asyncio

from services.inference.app import InferenceApp
from services.inference.config import InferenceConfig
from shared.config import load_config
from shared.logging import setup_logging
from shared.metrics import start_metrics_server


async def run(cfg: InferenceConfig) -> None:
    app = InferenceApp(cfg)
    app.server.install_signal_handlers()
    await app.start()
    await app.server.wait_for_stop_request()
    await app.stop()


def main() -> None:
    cfg = load_config(InferenceConfig)
    setup_logging("inference", cfg.log)
    start_metrics_server(cfg.host, cfg.metrics_port)
    asyncio.run(run(cfg))


# vLLM spawns worker processes that re-import the main module: keep the guard.
if __name__ == "__main__":
    main()
