"""Which requests the engine schedules first: people chatting before the loop's own work.

With vLLM's priority scheduling (``InferenceConfig.priority_scheduling``) every request carries an
integer priority; lower is scheduled earlier, ties by arrival. The engine's waiting queue is ordered
by it, and when the KV cache runs out vLLM preempts the running request with the highest
(priority, arrival) first: a trainer rollout before a user's chat.
"""

from __future__ import annotations

USER_PRIORITY = 0
"""The most urgent class, and the lowest number any request can get."""
OTHER_PRIORITY = 1
TRAINER_PRIORITY = 2

PRIORITY_CLASSES = {USER_PRIORITY: "user", OTHER_PRIORITY: "other", TRAINER_PRIORITY: "trainer"}
"""Label of each priority (the bounded label set of rlhf_inference_requests_by_priority_total)."""


def request_priority(source: str) -> int:
    """vLLM priority of a request from its ``source`` (a field the caller sets):

    ``user`` -> 0, ``trainer`` (rollouts) -> 2, anything else (evaluation, unknown, empty) -> 1.

    The result is never below the user's 0, and only the exact string ``user`` gets 0: no value of
    a client-controlled field can put a request ahead of the people chatting.
    """
    if source == "user":
        return USER_PRIORITY
    if source == "trainer":
        return TRAINER_PRIORITY
    return OTHER_PRIORITY


def priority_class(priority: int) -> str:
    """The metric label of ``priority``: its class name, or ``other`` for a value outside the classes
    (keeps the label set bounded whatever is passed)."""
    return PRIORITY_CLASSES.get(priority, "other")
