"""Configuration of the reward service (environment variables RLHF_REWARD_*)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from shared.config import KafkaConfig, ModelStoreConfig, ServiceConfig


@dataclass(frozen=True)
class RewardConfig(ServiceConfig):
    ENV_PREFIX: ClassVar[str] = "RLHF_REWARD_"

    kafka: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)
    """Kafka settings (RLHF_KAFKA_*): reward model announcements on rlhf.reward-models."""
    model_store: ModelStoreConfig = dataclasses.field(default_factory=ModelStoreConfig)
    """Where reward model (rm-NNNN) and policy versions live (RLHF_MODEL_STORE_*)."""
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
        return out
