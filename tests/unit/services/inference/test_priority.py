"""Engine priorities from a request's source: users first, the trainer's rollouts last, and no
value of the (client-controlled) source field ahead of the users."""

from __future__ import annotations

import pytest

from services.inference.priority import (
    OTHER_PRIORITY,
    PRIORITY_CLASSES,
    TRAINER_PRIORITY,
    USER_PRIORITY,
    priority_class,
    request_priority,
)


def test_users_come_before_other_sources_and_rollouts_come_last():
    assert request_priority("user") == USER_PRIORITY == 0
    assert request_priority("evaluation") == OTHER_PRIORITY
    assert request_priority("trainer") == TRAINER_PRIORITY
    assert USER_PRIORITY < OTHER_PRIORITY < TRAINER_PRIORITY  # vLLM: lower is scheduled earlier


@pytest.mark.parametrize("source", ["", "User", "user ", "-1", "0", "admin", "x" * 1000, "trainer\x00"])
def test_no_source_value_gets_ahead_of_or_beside_the_users(source):
    assert request_priority(source) > USER_PRIORITY


def test_priority_classes_are_a_bounded_label_set():
    assert [priority_class(request_priority(s)) for s in ("user", "eval", "trainer")] == ["user", "other", "trainer"]
    assert priority_class(-5) == priority_class(99) == "other"
    assert set(PRIORITY_CLASSES.values()) == {"user", "other", "trainer"}
