"""Prometheus metrics of the gateway."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "rlhf_gateway_requests_total",
    "HTTP requests by route template (e.g. /v1/models/{model_id}; every path no route serves is "
    "'unmatched') and status",
    ["route", "status"],
)
REQUEST_SECONDS = Histogram(
    "rlhf_gateway_request_seconds",
    "HTTP request duration (to the last byte for streams), by route template as in rlhf_gateway_requests_total",
    ["route"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UNHANDLED = Counter("rlhf_gateway_unhandled_errors_total", "Requests that failed with an unexpected error")
AUTH = Counter(
    "rlhf_gateway_auth_total",
    "How /v1/ callers were identified: key, session, new_anonymous; or refused: missing, invalid_key, invalid_session",
    ["result"],
)
REFUSED_CONNECTIONS = Counter(
    "rlhf_gateway_refused_connections_total",
    "Connections closed before a request was served: header_timeout (no complete request head within "
    "RLHF_GATEWAY_HEADER_TIMEOUT_S), header_too_large (a head over RLHF_GATEWAY_MAX_HEADER_BYTES)",
    ["reason"],
)
BODY_TIMEOUTS = Counter(
    "rlhf_gateway_body_timeouts_total",
    "Requests answered 408 because their body did not arrive within RLHF_GATEWAY_BODY_TIMEOUT_S",
)
FEEDBACK_QUEUE_DEPTH = Gauge(
    "rlhf_gateway_feedback_queue_depth",
    "Ratings waiting for a call to the feedback service (at most RLHF_GATEWAY_FEEDBACK_QUEUE_MAX)",
)
FEEDBACK_QUEUE_REFUSED = Counter(
    "rlhf_gateway_feedback_queue_refused_total",
    "Ratings answered 429 because the gateway's feedback queue was full",
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

# --- several versions at once (rollout/) ---------------------------------------------------------
ROUTED = Counter(
    "rlhf_gateway_routed_total",
    "Chat completions by the group of inference replicas that served them: stable, canary, side_by_side "
    "(an n=2 request answered once by each), canary_fallback (routed to the canary, served by the stable "
    "group because the canary group was unavailable)",
    ["group"],
)
CANARY_SHARE = Gauge(
    "rlhf_gateway_canary_share", "Share of principals/conversations this gateway routes to the canary (0: none)"
)
ROLLOUT_SEQUENCE = Gauge("rlhf_gateway_rollout_sequence", "Sequence number of the latest rollout event applied")
ROLLOUT_FOLLOWING = Gauge(
    "rlhf_gateway_rollout_following", "1 while the gateway has read rlhf.rollout to its end and follows it"
)
ROLLOUT_EVENTS = Counter(
    "rlhf_gateway_rollout_events_total", "Rollout events read from rlhf.rollout, by stage", ["stage"]
)
ROLLOUT_EVENTS_HELD = Gauge(
    "rlhf_gateway_rollout_events_held",
    "Recent rollout events kept for /flywheel (at most RLHF_GATEWAY_FLYWHEEL_EVENTS)",
)
ROLLOUT_FEED_ERRORS = Counter(
    "rlhf_gateway_rollout_feed_errors_total", "Times following rlhf.rollout failed and was started again"
)
ROLLOUT_STATUS_ERRORS = Counter(
    "rlhf_gateway_rollout_status_errors_total",
    "Calls of the rollout service's Status for /flywheel's live figures that failed (the page shows the events' figures)",
)

# --- streaming -----------------------------------------------------------------------------------
STREAM_CHUNKS = Counter(
    "rlhf_gateway_stream_chunks_total",
    "Completion chunks received from the inference service for streamed answers (one gRPC message each)",
)
STREAM_TOKENS = Counter(
    "rlhf_gateway_stream_tokens_total",
    "Completion tokens received for streamed answers; divided by rlhf_gateway_stream_chunks_total: the "
    "tokens per message (RLHF_INFERENCE_STREAM_COALESCE_MS sets how many the inference service groups)",
)
