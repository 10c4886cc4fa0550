"""The token bucket: a burst, then the rate."""

import pytest

from services.feedback.limits import TokenBucket


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_burst_then_the_rate():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, capacity=3.0, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.t = 0.5  # one token back
    assert bucket.take() and not bucket.take()
    clock.t = 100.0  # never more than the capacity saved up
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_taking_more_than_is_held_spends_nothing():
    bucket = TokenBucket(rate=0.0, capacity=10.0, clock=Clock())
    assert not bucket.take(11) and bucket.take(10) and not bucket.take(1)


def test_zero_refuses_everything_and_negative_is_an_error():
    assert not TokenBucket(0.0, 0.0, clock=Clock()).take()
    with pytest.raises(ValueError):
        TokenBucket(-1.0, 1.0)
