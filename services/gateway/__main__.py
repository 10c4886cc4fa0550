"""`python -m services.gateway`: run the HTTP gateway until SIGTERM (uvicorn drains requests)."""

from __future__ import annotations

import uvicorn

from services.gateway.api_router import create_app
from services.gateway.config import GatewayConfig
from shared.config import load_config
from shared.logging import setup_logging


def main() -> None:
    cfg = load_config(GatewayConfig)
    setup_logging("gateway", cfg.log)
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=int(cfg.grace_period_s))


if __name__ == "__main__":
    main()
