"""Prometheus metrics of the gateway."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("rlhf_gateway_requests_total", "HTTP requests", ["route", "status"])
REQUEST_SECONDS = Histogram(
    "rlhf_gateway_request_seconds",
    "HTTP request duration (to the last byte for streams)",
    ["route"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UNHANDLED = Counter("rlhf_gateway_unhandled_errors_total", "Requests that failed with an unexpected error")
AUTH = Counter(
    "rlhf_gateway_auth_total",
    "How /v1/ callers were identified: key, session, new_anonymous; or refused: missing, invalid_key, invalid_session",
    ["result"],
)
RATE_LIMIT = Counter("rlhf_gateway_rate_limit_total", "Requests by rate-limit outcome", ["limit", "outcome"])
RATE_LIMIT_PRINCIPALS = Gauge(
    "rlhf_gateway_rate_limit_principals", "Principals with a token bucket (bounded LRU map)", ["limit"]
)
RATE_LIMIT_EVICTIONS = Counter(
    "rlhf_gateway_rate_limit_evictions_total",
    "Buckets dropped from the LRU map to keep it at RLHF_GATEWAY_RATE_LIMIT_PRINCIPALS",
    ["limit"],
)
