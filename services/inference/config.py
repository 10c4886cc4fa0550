"""Configuration of the inference service (environment variables RLHF_INFERENCE_*)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from shared.config import KafkaConfig, ModelStoreConfig, ServiceConfig, VersionTrustConfig

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The LoRA slot ranks vLLM can be started with (vllm.config.lora.MaxLoRARanks)."""


@dataclass(frozen=True)
class InferenceConfig(ServiceConfig):
    ENV_PREFIX: ClassVar[str] = "RLHF_INFERENCE_"

    kafka: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)
    """Kafka settings (RLHF_KAFKA_*): completion events out, policy updates in."""
    model_store: ModelStoreConfig = dataclasses.field(default_factory=ModelStoreConfig)
    """Where policy versions are read from (RLHF_MODEL_STORE_*)."""
    versions: VersionTrustConfig = dataclasses.field(default_factory=VersionTrustConfig)
    """The keys policy versions must be signed with, and where verified copies are loaded from
    (RLHF_VERSIONS_*: POLICY_VERIFY_KEY_FILE / POLICY_VERIFY_KEYS, COPIES_DIR)."""
    grpc_port: int = 50051
    """Port of the InferenceService gRPC server."""
    metrics_port: int = 9101
    """Port of the Prometheus /metrics endpoint; 0 disables it."""
    policy_version: str = ""
    """Serve this policy version at start; empty serves the store's current policy."""
    served_model_name: str = "rlhf-policy"
    """Model name reported to clients (OpenAI's `model`)."""
    follow_updates: bool = True
    """Consume the followed pointer's announcements (RLHF_INFERENCE_FOLLOW) and hot-swap to each
    announced version."""
    follow: str = "current"
    """Which pointer of the policy line this replica serves (progressive rollout): `current` (the
    stable group; announcements on rlhf.policy-updates) or `canary` (the canary group: the version the
    rollout service runs as a canary, announced on rlhf.policy-canary; the stable version while none
    runs, and until the canary pointer was ever announced)."""
    swap_mode: str = "bounded"
    """How a hot-swap on one replica treats requests in flight. `bounded` (default): new requests
    wait at most RLHF_INFERENCE_SWAP_DRAIN_BUDGET_S while those in flight finish on the old weights;
    what still runs then is swapped under immediately (recomputed, it finishes on the new weights and
    its completion lists both versions). The pause stays under a second (budget + reload) and never
    waits for the slowest request in flight, while the many requests about to end finish on one
    version (no recompute, and the trainer keeps its rollouts: it drops those that straddle a swap).
    `drain`: wait for every request in flight, so every completion comes from exactly one version
    (the pause is the longest remaining generation: seconds with long answers). `immediate`: the
    swap happens between two engine steps; every request in flight is recomputed and finishes on the
    new weights (the pause is about the reload time) and their completions say they straddled two
    versions."""
    swap_drain_budget_s: float = 0.3
    """In swap_mode `bounded`, and after the drain of a rolling swap, how long new requests may be
    held while the requests in flight finish before the rest is swapped under them; 0 makes
    `bounded` behave as `immediate`. Kept well under a second: the pause is this plus the reload
    (about 0.1 s for the default model on CPU)."""
    swap_lease_dir: Path | None = None
    """Rolling swaps for a group of several replicas: a directory every replica of the group can write
    (the model store's root on one machine; a shared volume on Kubernetes) holding the group's swap
    lease. Set: replicas take a new version one at a time; each reports NOT_SERVING (health service
    rlhf.v1.InferenceService: the gateway's channels route around it), drains (bounded by
    RLHF_INFERENCE_SWAP_DRAIN_TIMEOUT_S), reloads and reports SERVING before the next one starts.
    Unset: the version is swapped in place by RLHF_INFERENCE_SWAP_MODE (one replica)."""
    swap_lease_ttl_s: float = 600.0
    """A swap lease older than this is taken over (its holder died mid-swap); longer than a swap."""
    swap_drain_timeout_s: float = 60.0
    """In a rolling swap, how long the requests in flight may take to finish; the rest is swapped
    immediately (they finish on the new weights and say so)."""
    swap_settle_s: float = 1.0
    """In a rolling swap, the pause after reporting NOT_SERVING (before draining) and after reporting
    SERVING again (before the next replica may start), so that clients see each change."""
    dtype: str = "float32"
    """Weights dtype in the engine: float32 (exact, CPU default), bfloat16 or float16 (GPUs)."""
    max_model_len: int = 1024
    """Context length: prompt plus completion tokens."""
    default_max_tokens: int = 256
    """Completion length when a request does not say."""
    max_tokens_limit: int = 768
    """Largest max_tokens a request may ask for."""
    max_n: int = 8
    """Most completions per request (rankings need up to 9 with K-way comparisons; see the feedback service)."""
    max_messages: int = 256
    """Most chat messages in one request."""
    max_message_chars: int = 32768
    """Longest content of one chat message, in characters."""
    max_prompt_chars: int = 131072
    """Longest prompt: the characters of all messages' contents together. Checked before the prompt
    is tokenised (a 1 MiB prompt is refused at once, never tokenised); a prompt that passes may
    still be refused for its token count (RLHF_INFERENCE_MAX_MODEL_LEN)."""
    state_dir: Path = Path("var/inference")
    """Local state of this replica: the outbox's spill journal (``outbox-<gRPC port>/``), where every
    completion event waits until Kafka acknowledges it, so that ``kill -9`` loses none: a restarted
    replica sends what is left. Per replica (the port tells replicas on one machine apart; with
    RLHF_INFERENCE_GRPC_PORT=0 the events wait in memory instead); on Kubernetes a volume that
    outlives the container (the pod's emptyDir)."""
    outbox_spill_max_mb: int = 1024
    """Most MiB of completion events the spill journal holds while Kafka is unreachable; past it the
    oldest are dropped (error log, rlhf_kafka_events_dropped_total). Memory holds one event at a time."""
    outbox_max_attempts: int = 20
    """Failed sends of one completion event in a row before, if Kafka answers and it fails once more,
    it is moved aside (to aside.seg in the spill directory; rlhf_kafka_outbox_moved_aside_total) so
    that it no longer holds the others back."""
    max_num_seqs: int = 128
    """Most sequences the engine batches at once (vLLM's max_num_seqs)."""
    kv_cache_gib: int = 1
    """KV cache size in GiB on CPU (vLLM's VLLM_CPU_KVCACHE_SPACE)."""
    cpu_threads_bind: str = "auto"
    """vLLM CPU OpenMP thread binding (VLLM_CPU_OMP_THREADS_BIND): auto, nobind, or a core list like 0-1."""
    cpu_omp_wait_policy: str = "passive"
    """How the engine's OpenMP threads wait between the parallel regions of a step (OMP_WAIT_POLICY of
    the engine process): ``passive`` sleeps at once and gives the cores back, ``active`` spins on
    them, ``""`` keeps the environment's value (libgomp then spins a short while). On CPU the engine
    runs hundreds of small parallel regions per step with Python in between: spinning there kept both
    cores of a two-core machine busy and starved the gateway, this service's event loop and the
    trainer next to it (measured: docs/benchmarks.md, "OpenMP threads that sleep"). ``active`` only
    on a machine whose cores serve the engine alone. No effect on what a GPU computes."""
    gpu_memory_utilization: float = 0.85
    """Fraction of GPU memory vLLM may use (GPU builds only)."""
    tensor_parallel_size: int = 1
    """GPUs per engine (GPU builds only)."""
    worker_in_engine_process: bool = True
    """Run vLLM's model worker inside its engine-core process rather than spawning one more process
    (each spawn re-imports torch and vLLM, which slows start; see docs/benchmarks.md). Single device
    only; vLLM's CPU thread binding (cpu_threads_bind) applies only when this is off."""
    enforce_eager: bool = True
    """Run the model eagerly, skipping torch.compile and graph capture: on CPU this cuts engine start
    from minutes to seconds; set 0 on GPUs for the faster compiled path."""
    seed: int = 0
    """Engine seed; requests without a seed sample from the engine's generator."""
    priority_scheduling: bool = True
    """Run vLLM with scheduling_policy="priority" and give each request a priority from its source
    (users 0, other sources 1, the trainer's rollouts 2; services/inference/priority.py), so that a
    user's request is scheduled ahead of queued rollouts and, when the KV cache runs out, rollouts
    are preempted first. On by default: the trainer samples through the same engine as the people
    chatting, and its work must never make them wait. Off: first come, first served."""
    stream_coalesce_ms: float = 100.0
    """Streamed answers: after each message, wait until this many milliseconds after its output was
    taken from the engine and send everything produced meanwhile as one message (several tokens per
    gRPC message, and per SSE event at the gateway). The first message is never held (TTFT is
    untouched); 0 sends whatever is ready each time (about one token per message). 100 ms (ten
    updates a second, five tokens a message at 64 clients) rather than 40 (two tokens): every
    message costs the inference service, the gateway and the client a wake-up, and on busy cores
    those wake-ups delayed other users' first tokens (docs/benchmarks.md, "Fewer, fuller messages")."""
    stream_max_tokens_per_chunk: int = 16
    """Streamed answers: shorten the wait above when, at the stream's own pace, this many tokens
    will be ready sooner; 0: no count bound (the window alone)."""
    lora_adapters: bool = False
    """Serve adapter versions (LoRA policies, the trainer's RLHF_TRAINER_POLICY_MODE=lora) in vLLM's
    LoRA slots: an announced adapter is loaded beside the base weights at run time, without pausing
    any request, and served once it is proven loaded (services/inference/adapters.py); the previous
    one stays loaded. Off (default): the engine has no LoRA slots (slightly faster) and an announced
    adapter version is refused. A full-weight version (a new base) is swapped in place either way."""
    lora_max_loaded: int = 4
    """With lora_adapters: most adapter versions held in the engine at once (vLLM's max_cpu_loras).
    Loading one more unloads the least recently used adapter that no pointer serves and no request
    runs with; at least 2 (the served adapter and the one replacing it)."""
    lora_max_batch: int = 0
    """With lora_adapters: most distinct adapters in one engine batch (vLLM's max_loras); 0 (default):
    RLHF_INFERENCE_LORA_MAX_LOADED, every loaded adapter. A request on one more adapter waits until a
    batch holds fewer, and so does the one-token proof of a new adapter: with the served adapter and
    a canary running, fewer than 3 would hold a swap until one of them has no request left."""
    lora_max_rank: int = 16
    """With lora_adapters: the largest LoRA rank the slots take (vLLM's max_lora_rank: 1, 8, 16, 32,
    64, 128, 256, 320 or 512); an adapter of a higher rank is refused."""
    lora_canary_beside: bool = False
    """With lora_adapters, on a replica following `current`: also follow the canary pointer
    (rlhf.policy-canary) and hold its adapter version loaded beside the served one, so that this one
    engine answers requests naming the canary version (GenerateRequest.policy_version) as well as
    the stable ones: no separate canary group needed while versions are adapters of one base. Needs
    RLHF_INFERENCE_LORA_MAX_LOADED of at least 3 (served, canary, and the next one loading)."""

    def problems(self) -> list[str]:
        out = super().problems()
        p = self.ENV_PREFIX
        if self.swap_mode not in {"bounded", "drain", "immediate"}:
            out.append(f"{p}SWAP_MODE={self.swap_mode!r}: expected bounded, drain or immediate")
        if not 0 <= self.swap_drain_budget_s <= 60:
            out.append(f"{p}SWAP_DRAIN_BUDGET_S={self.swap_drain_budget_s:g}: expected 0 to 60 seconds")
        if self.follow not in ("current", "canary"):
            out.append(f"{p}FOLLOW={self.follow!r}: expected current or canary")
        if self.swap_drain_timeout_s <= 0 or self.swap_settle_s < 0:
            out.append(f"{p}SWAP_DRAIN_TIMEOUT_S must be positive and {p}SWAP_SETTLE_S not negative")
        elif self.swap_lease_ttl_s < rolling_swap_bound_s(self):
            out.append(
                f"{p}SWAP_LEASE_TTL_S={self.swap_lease_ttl_s:g} must exceed a swap: at least "
                f"{p}SWAP_DRAIN_TIMEOUT_S + {p}SWAP_DRAIN_BUDGET_S + 2 x {p}SWAP_SETTLE_S + 30 s for the "
                f"reload ({rolling_swap_bound_s(self):g} s)"
            )
        if self.cpu_omp_wait_policy not in {"passive", "active", ""}:
            out.append(f"{p}CPU_OMP_WAIT_POLICY={self.cpu_omp_wait_policy!r}: expected passive, active or empty")
        if self.dtype not in {"float32", "bfloat16", "float16"}:
            out.append(f"{p}DTYPE={self.dtype!r}: expected float32, bfloat16 or float16")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            out.append(f"{p}DEFAULT_MAX_TOKENS must be between 1 and {p}MAX_TOKENS_LIMIT")
        if self.max_tokens_limit >= self.max_model_len:
            out.append(f"{p}MAX_TOKENS_LIMIT must be below {p}MAX_MODEL_LEN (room for the prompt)")
        if self.max_n < 1:
            out.append(f"{p}MAX_N must be at least 1")
        if not self.max_message_chars <= self.max_prompt_chars <= MAX_PROMPT_CHARS_LIMIT:
            out.append(
                f"{p}MAX_PROMPT_CHARS={self.max_prompt_chars}: expected {p}MAX_MESSAGE_CHARS "
                f"({self.max_message_chars}) to {MAX_PROMPT_CHARS_LIMIT}"
            )
        if self.outbox_spill_max_mb < 2 * OUTBOX_SEGMENT_MB:
            out.append(f"{p}OUTBOX_SPILL_MAX_MB={self.outbox_spill_max_mb}: at least {2 * OUTBOX_SEGMENT_MB}")
        if self.outbox_max_attempts < 1:
            out.append(f"{p}OUTBOX_MAX_ATTEMPTS={self.outbox_max_attempts}: at least 1")
        if self.kv_cache_gib < 1:
            out.append(f"{p}KV_CACHE_GIB must be at least 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            out.append(f"{p}GPU_MEMORY_UTILIZATION must be in (0, 1]")
        if not 0 <= self.stream_coalesce_ms <= 1000:
            out.append(f"{p}STREAM_COALESCE_MS={self.stream_coalesce_ms:g}: expected 0 to 1000 milliseconds")
        if self.stream_max_tokens_per_chunk < 0:
            out.append(f"{p}STREAM_MAX_TOKENS_PER_CHUNK must not be negative (0: no count bound)")
        if self.lora_max_rank not in LORA_RANKS:
            out.append(f"{p}LORA_MAX_RANK={self.lora_max_rank}: expected one of {', '.join(map(str, LORA_RANKS))}")
        if self.lora_max_loaded < 2:
            out.append(f"{p}LORA_MAX_LOADED={self.lora_max_loaded}: at least 2 (the served adapter and the next)")
        if not 0 <= self.lora_max_batch <= self.lora_max_loaded:
            out.append(f"{p}LORA_MAX_BATCH={self.lora_max_batch}: expected 0 (all) to {p}LORA_MAX_LOADED")
        if self.lora_canary_beside and not (self.lora_adapters and self.follow == "current"):
            out.append(f"{p}LORA_CANARY_BESIDE needs {p}LORA_ADAPTERS=1 and {p}FOLLOW=current")
        elif self.lora_canary_beside and self.lora_max_loaded < 3:
            out.append(f"{p}LORA_MAX_LOADED={self.lora_max_loaded}: at least 3 with {p}LORA_CANARY_BESIDE")
        elif self.lora_canary_beside and 0 < self.lora_max_batch < 3:
            out.append(f"{p}LORA_MAX_BATCH={self.lora_max_batch}: at least 3 (or 0) with {p}LORA_CANARY_BESIDE")
        out += self.versions.missing(self.host, follows=("policy",))
        return out


MAX_PROMPT_CHARS_LIMIT = 16 << 20
"""Largest RLHF_INFERENCE_MAX_PROMPT_CHARS accepted (a prompt is held in memory and tokenised)."""
OUTBOX_SEGMENT_MB = 8
"""Size of one segment file of the outbox's spill journal (a fully acknowledged one is deleted)."""


def outbox_spill_dir(cfg: InferenceConfig, port: int) -> Path:
    """The spill journal of the replica serving gRPC on ``port``: ``<state_dir>/outbox-<port>``."""
    return cfg.state_dir / f"outbox-{port}"


RELOAD_ALLOWANCE_S = 30.0
"""Time a rolling swap allows for the reload itself, in the lease TTL check."""


def rolling_swap_bound_s(cfg: InferenceConfig) -> float:
    """The longest a rolling swap may hold its group's lease: settle + drain timeout + drain budget
    (the last stragglers, in swap_to) + reload allowance + settle. The lease TTL must be at least
    this, or another replica could take the lease over mid-swap."""
    return cfg.swap_drain_timeout_s + cfg.swap_drain_budget_s + 2 * cfg.swap_settle_s + RELOAD_ALLOWANCE_S


def lora_batch(cfg: InferenceConfig) -> int:
    """Distinct adapters one engine batch may hold (vLLM's max_loras): lora_max_batch, or when it is 0
    every loaded adapter (lora_max_loaded)."""
    return cfg.lora_max_batch or cfg.lora_max_loaded


def swap_drain_s(cfg: InferenceConfig) -> float:
    """How long a swap on one replica holds new requests waiting for those in flight, by
    swap_mode: drain -> unbounded (inf), immediate -> 0, bounded -> swap_drain_budget_s."""
    if cfg.swap_mode == "drain":
        return math.inf
    if cfg.swap_mode == "immediate":
        return 0.0
    return cfg.swap_drain_budget_s
