"""Prometheus metrics of the gateway."""

from prometheus_client import Counter, Histogram

REQUESTS = Counter("rlhf_gateway_requests_total", "HTTP requests", ["route", "status"])
REQUEST_SECONDS = Histogram(
    "rlhf_gateway_request_seconds",
    "HTTP request duration (to the last byte for streams)",
    ["route"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UNHANDLED = Counter("rlhf_gateway_unhandled_errors_total", "Requests that failed with an unexpected error")
