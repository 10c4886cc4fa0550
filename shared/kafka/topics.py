"""Every Kafka topic of the loop, named in this one place."""

from __future__ import annotations

COMPLETIONS = "rlhf.completions"
"""One event per served completion (inference -> reward learner, trainer)."""
FEEDBACK = "rlhf.feedback"
"""Accepted ratings from users (feedback -> reward learner)."""
FEEDBACK_DLQ = "rlhf.feedback.dlq"
"""Refused ratings with the reason (feedback -> humans)."""
REWARD_MODELS = "rlhf.reward-models"
"""Announcements of published reward model versions (reward learner -> reward scorers, trainer)."""
POLICY_UPDATES = "rlhf.policy-updates"
"""Announcements of the current (stable) policy version (trainer, or the rollout service when rollout
is on -> inference)."""
POLICY_CANDIDATES = "rlhf.policy-candidates"
"""Announcements of the trainer's gated candidate versions (trainer -> rollout service)."""
POLICY_CANARY = "rlhf.policy-canary"
"""Announcements of the version the canary replicas serve (rollout service -> canary inference)."""
ROLLOUT = "rlhf.rollout"
"""Every step of every policy version's rollout, each carrying the whole routing state (rollout
service -> itself on restart, gateway router, /flywheel page)."""

ALL_TOPICS: tuple[str, ...] = (
    COMPLETIONS,
    FEEDBACK,
    FEEDBACK_DLQ,
    REWARD_MODELS,
    POLICY_UPDATES,
    POLICY_CANDIDATES,
    POLICY_CANARY,
    ROLLOUT,
)
