"""Prometheus metrics of the inference service."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("rlhf_inference_requests_total", "Generation requests", ["source", "outcome"])
COMPLETION_TOKENS = Counter("rlhf_inference_completion_tokens_total", "Tokens generated")
PROMPT_TOKENS = Counter("rlhf_inference_prompt_tokens_total", "Prompt tokens processed")
IN_FLIGHT = Gauge("rlhf_inference_in_flight_requests", "Requests being generated")
IN_FLIGHT_BY_SOURCE = Gauge(
    "rlhf_inference_in_flight_by_source", "Requests admitted and not finished, by source (user, trainer)", ["source"]
)
WAITING_FIRST_TOKEN = Gauge(
    "rlhf_inference_waiting_first_token",
    "Requests in flight still waiting for their first token (queued or in prefill), by source",
    ["source"],
)
REQUEST_SECONDS = Histogram(
    "rlhf_inference_request_seconds", "Arrival to last token", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
)
TTFT_SECONDS = Histogram(
    "rlhf_inference_time_to_first_token_seconds",
    "Arrival to first token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REQUESTS_BY_PRIORITY = Counter(
    "rlhf_inference_requests_by_priority_total",
    "Requests admitted, by the engine priority class their source gave them (user, other, trainer)",
    ["priority_class"],
)
POLICY_VERSION = Gauge("rlhf_inference_policy_info", "1 for the policy version being served", ["version"])
SWAPS = Counter("rlhf_inference_swaps_total", "Hot-swaps to a new policy version")
SWAP_REFUSED = Counter("rlhf_inference_swap_refused_total", "Policy updates refused", ["reason"])
SWAP_PAUSE_SECONDS = Histogram(
    "rlhf_inference_swap_pause_seconds",
    "Time new requests were held during a swap (drain + reload)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SWAPPED_UNDER = Counter(
    "rlhf_inference_swapped_under_requests_total",
    "Requests still in flight when a swap reloaded the weights (recomputed; they list both versions)",
)

# --- rolling swaps (several replicas of a group; swap_lease.py) ----------------------------------
ROUTABLE = Gauge(
    "rlhf_inference_routable",
    "1 while this replica reports SERVING to the gateway's channels; 0 while it drains and reloads in a rolling swap",
)
SWAP_LEASE_WAIT_SECONDS = Histogram(
    "rlhf_inference_swap_lease_wait_seconds",
    "Time a replica waited for its group's swap lease (another replica was swapping)",
    buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
SWAP_LEASE_TAKEOVERS = Counter(
    "rlhf_inference_swap_lease_takeovers_total", "Expired swap leases taken over (their holder died mid-swap)"
)
ROLLING_DRAIN_TIMEOUTS = Counter(
    "rlhf_inference_rolling_drain_timeouts_total",
    "Rolling swaps whose requests in flight outlasted RLHF_INFERENCE_SWAP_DRAIN_TIMEOUT_S (swapped immediately)",
)

# --- adapter versions in the engine's LoRA slots (adapters.py) -----------------------------------
ADAPTERS_LOADED = Gauge("rlhf_inference_adapters_loaded", "Adapter versions held in the engine's LoRA slots")
ADAPTER_LOADS = Counter(
    "rlhf_inference_adapter_loads_total",
    "Adapter versions loaded into the engine, by outcome (ok, failed)",
    ["outcome"],
)
ADAPTER_UNLOADS = Counter(
    "rlhf_inference_adapter_unloads_total",
    "Adapter versions unloaded, by reason (lru: room for another; base_changed: a new base dropped them)",
    ["reason"],
)
ADAPTER_LOAD_SECONDS = Histogram(
    "rlhf_inference_adapter_load_seconds",
    "Time to load an adapter version and prove it serves (add to the engine, one-token probe)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ADAPTER_ENGINE_HOLD_SECONDS = Histogram(
    "rlhf_inference_adapter_engine_hold_seconds",
    "How long the engine's other requests were held while it added an adapter version (vLLM's add_lora "
    "between two steps, timed in the model worker): the pause an adapter swap costs them",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
ADAPTER_REQUESTS = Counter(
    "rlhf_inference_adapter_requests_total",
    "Requests served with an adapter version, by whether they named it (named) or took the served one (served)",
    ["how"],
)
STAGED_WEIGHT_BYTES = Gauge(
    "rlhf_inference_staged_weight_bytes",
    "Bytes of a full-weight version read into the engine's worker and not yet loaded (at most one version)",
)
