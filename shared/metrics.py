"""Prometheus metrics: every service exposes /metrics (prometheus-client's default registry).

Metric objects are module-level constants in the module that owns them (each service has a
``metrics.py``); this module only starts the HTTP endpoint.
"""

from __future__ import annotations

from prometheus_client import start_http_server

from shared.logging import get_logger, log_event

log = get_logger(__name__)


def start_metrics_server(host: str, port: int) -> None:
    """Serve /metrics on ``host:port`` in a daemon thread; ``port`` 0 disables it."""
    if port == 0:
        return
    start_http_server(port, addr=host)
    log_event(log, "metrics endpoint up", url=f"http://{host}:{port}/metrics")
