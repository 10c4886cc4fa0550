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
"""Announcements of published policy versions (trainer -> inference)."""

ALL_TOPICS: tuple[str, ...] = (COMPLETIONS, FEEDBACK, FEEDBACK_DLQ, REWARD_MODELS, POLICY_UPDATES)
