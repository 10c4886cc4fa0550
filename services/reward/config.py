"""Configuration of the reward service (environment variables RLHF_REWARD_*)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from shared.config import KafkaConfig, ModelStoreConfig, ServiceConfig, VersionTrustConfig


@dataclass(frozen=True)
class RewardConfig(ServiceConfig):
    ENV_PREFIX: ClassVar[str] = "RLHF_REWARD_"

    kafka: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)
    """Kafka settings (RLHF_KAFKA_*): reward model announcements on rlhf.reward-models."""
    model_store: ModelStoreConfig = dataclasses.field(default_factory=ModelStoreConfig)
    """Where reward model (rm-NNNN) and policy versions live (RLHF_MODEL_STORE_*)."""
    versions: VersionTrustConfig = dataclasses.field(default_factory=VersionTrustConfig)
    """The keys reward model versions are signed with (RM_SIGNING_KEY*: the retraining loop and the
    first RM) and verified with (RM_VERIFY_KEY*: the scorer), and where verified copies are loaded
    from (RLHF_VERSIONS_*)."""
    grpc_port: int = 50053
    """Port of the RewardService gRPC server."""
    metrics_port: int = 9103
    """Port of the Prometheus /metrics endpoint; 0 disables it."""
    rm_version: str = ""
    """Score with this reward model version at start; empty uses the store's current rm version."""
    follow_updates: bool = True
    """Consume rlhf.reward-models and hot-swap to each announced version (needs Kafka)."""
    bootstrap_rankings: Path | None = None
    """When the store holds no reward model at start: train rm-0001 from this JSONL rankings file
    (services/reward/offline.py; e.g. services/reward/data/example_rankings.jsonl) on the current
    policy. Unset: the service refuses to start without a reward model."""
    max_items: int = 256
    """Most (conversation, response) items in one Score request."""
    max_batch_size: int = 16
    """Most sequences in one forward pass; a request with more items runs several passes."""
    max_tokens: int = 512
    """Longest sequence (prompt + response tokens) the reward model reads; longer prompts are cut
    from the left (see reward.proto). At most the backbone's context length."""
    max_response_tokens: int = 256
    """Longest response part in tokens (the closing EOS included); longer responses are cut at the end."""
    max_messages: int = 256
    """Most chat messages in one item."""
    max_message_chars: int = 32768
    """Longest content of one chat message, in characters."""
    max_response_chars: int = 32768
    """Longest response, in characters."""
    torch_threads: int = 0
    """Intra-op threads of the forward passes; 0 keeps torch's default (one per core)."""
    device: str = "cpu"
    """torch device the scoring model runs on: `cpu`, `cuda` or `cuda:N` (the continual learner
    trains on the CPU)."""
    precision: str = "auto"
    """Compute precision of scoring: `bf16` (autocast), `float32`, or `auto` (bf16 on a GPU,
    float32 on the CPU). The weights stay as stored; scores are returned as float32."""
    learner: bool = True
    """Run the continual learner in this process (needs Kafka): it reads rlhf.feedback and
    rlhf.completions, retrains the RM and publishes gated versions (services/reward/retraining.py).
    Exactly one reward replica may run it."""
    state_dir: Path = Path("var/reward-learner")
    """Where the learner keeps its SQLite state (votes, completion texts, what was trained, topic
    offsets); a persistent volume in Kubernetes. Lost state is rebuilt from the topics."""
    learn_every_comparisons: int = 32
    """Train a candidate once this many new comparisons (groups or lone thumbs) have arrived..."""
    learn_every_s: float = 300.0
    """...or once this many seconds have passed since the last round and at least one has."""
    gate_tolerance: float = 0.02
    """Publish a candidate only if its held-out pairwise accuracy is at least the current RM's
    accuracy on the same held-out comparisons minus this."""
    heldout_fraction: float = 0.2
    """Fraction of prompts (by prompt hash, so stable across rounds) whose comparisons are held
    out for the gate and never trained on."""
    replay_ratio: float = 1.0
    """Older (already trained) comparisons mixed into a round per new one, so the RM does not forget."""
    max_principal_share: float = 0.1
    """Most of a round's new comparisons, and of its held-out slice, that one principal
    (FeedbackEvent.user_id) may hold; its comparisons above the cap wait for later rounds, oldest
    first. 1 turns the cap off (a closed set of trusted raters). See services/reward/raters.py."""
    min_principal_cap: int = 8
    """Comparisons a principal may always keep in a round (and in the held-out slice) whatever its
    share: with fewer than 1 / MAX_PRINCIPAL_SHARE principals a share alone would keep nothing."""
    quarantine_below: float = 0.4
    """Quarantine a principal whose agreement is below this with 95% confidence (Wilson upper bound):
    with other raters on the pairs of responses both ordered, or (with too few of those) with the
    reward model. Its ratings stay on
    Kafka and in the state but are neither trained on nor held out, until an operator releases it
    (`rlhf raters release NAME`). 0 turns quarantine off."""
    quarantine_min_items: int = 20
    """Pairs a principal's agreement must rest on before the quarantine rule judges it."""
    pending_timeout_s: float = 600.0
    """How long a vote waits for the completions it rates before it is counted and dropped."""
    learner_epochs: int = 2
    """Passes over a round's training comparisons (new + replayed)."""
    learner_lr: float = 5e-5
    """AdamW learning rate of a round (warm start from the current RM)."""
    learner_batch_size: int = 8
    """Comparisons per optimiser step."""
    reference_responses: int = 256
    """Normalisation: the most recent this many stored completions score 0 on average."""
    completion_retention_s: float = 7 * 24 * 3600.0
    """Completions nobody rated are forgotten after this long."""

    def problems(self) -> list[str]:
        out = super().problems()
        p = self.ENV_PREFIX
        if self.max_items < 1:
            out.append(f"{p}MAX_ITEMS must be at least 1")
        if self.max_batch_size < 1:
            out.append(f"{p}MAX_BATCH_SIZE must be at least 1")
        if not 2 <= self.max_response_tokens < self.max_tokens:
            out.append(f"{p}MAX_RESPONSE_TOKENS must be at least 2 and below {p}MAX_TOKENS (room for the prompt)")
        if min(self.max_messages, self.max_message_chars, self.max_response_chars) < 1:
            out.append(f"{p}MAX_MESSAGES, {p}MAX_MESSAGE_CHARS and {p}MAX_RESPONSE_CHARS must be positive")
        if self.torch_threads < 0:
            out.append(f"{p}TORCH_THREADS must not be negative")
        out += self._device_problems()
        if self.learn_every_comparisons < 1 or self.learn_every_s <= 0:
            out.append(f"{p}LEARN_EVERY_COMPARISONS must be at least 1 and {p}LEARN_EVERY_S positive")
        if not 0 <= self.gate_tolerance <= 1:
            out.append(f"{p}GATE_TOLERANCE must be in [0, 1]")
        if not 0 < self.heldout_fraction < 1:
            out.append(f"{p}HELDOUT_FRACTION must be in (0, 1): the gate needs held-out comparisons")
        if self.replay_ratio < 0:
            out.append(f"{p}REPLAY_RATIO must not be negative")
        if not 0 < self.max_principal_share <= 1:
            out.append(f"{p}MAX_PRINCIPAL_SHARE must be in (0, 1] (1 turns the cap off)")
        if self.min_principal_cap < 1:
            out.append(f"{p}MIN_PRINCIPAL_CAP must be at least 1")
        if not 0 <= self.quarantine_below <= 1:
            out.append(f"{p}QUARANTINE_BELOW must be in [0, 1] (0 turns quarantine off)")
        if self.quarantine_min_items < 1:
            out.append(f"{p}QUARANTINE_MIN_ITEMS must be at least 1")
        if self.pending_timeout_s <= 0 or self.completion_retention_s <= 0:
            out.append(f"{p}PENDING_TIMEOUT_S and {p}COMPLETION_RETENTION_S must be positive")
        if self.learner_epochs < 1 or self.learner_batch_size < 1 or self.learner_lr <= 0:
            out.append(f"{p}LEARNER_EPOCHS and {p}LEARNER_BATCH_SIZE must be at least 1, {p}LEARNER_LR positive")
        if self.reference_responses < 1:
            out.append(f"{p}REFERENCE_RESPONSES must be at least 1")
        signs = ("rm",) if self.learner or self.bootstrap_rankings else ()
        out += self.versions.missing(self.host, signs=signs, follows=("rm",))
        return out

    def _device_problems(self) -> list[str]:
        """DEVICE and PRECISION checked, each problem naming its variable."""
        from shared.models.loading import PRECISIONS, device_problems

        p = self.ENV_PREFIX
        out = [f"{p}DEVICE: {problem}" for problem in device_problems(self.device)]
        if self.precision not in PRECISIONS:
            out.append(f"{p}PRECISION={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        return out
