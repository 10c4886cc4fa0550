"""The demo's statistics (flywheel/demo/evaluate.py): Wilson intervals, win outcomes, mean intervals."""

from __future__ import annotations

import math

import pytest

from flywheel.demo.evaluate import mean_interval, wilson_interval, win_outcome, win_rate_ceiling


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # textbook Wilson 95% for 8/10
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_win_outcome_and_mean_interval():
    assert [win_outcome(1, 2), win_outcome(2, 2), win_outcome(3, 2)] == [1.0, 0.5, 0.0]
    mean, low, high = mean_interval([1.0, 0.0, 1.0, 0.5])
    assert mean == pytest.approx(0.625)
    sd = math.sqrt(sum((v - 0.625) ** 2 for v in [1.0, 0.0, 1.0, 0.5]) / 3)
    assert mean - low == pytest.approx(1.959964 * sd / 2)
    assert high == 1.0  # clipped: a win rate cannot pass 100%
    assert mean_interval([1.0, 1.0]) == (1.0, 1.0, 1.0)


def test_win_rate_ceiling_is_what_a_perfect_policy_reaches():
    scores_a = [4, 4, 3, 2, 0, 4, 1, 4, 2, 3]  # A perfect in 4 of 10 pairs
    assert win_rate_ceiling(scores_a) == pytest.approx(1 - 0.4 / 2)
    perfect_b = [win_outcome(a, 4) for a in scores_a]
    assert win_rate_ceiling(scores_a) == pytest.approx(sum(perfect_b) / len(perfect_b))
    # no B does better: every other answer of B loses or ties at least as often
    for b in range(4):
        assert sum(win_outcome(a, b) for a in scores_a) / len(scores_a) < win_rate_ceiling(scores_a)
    assert win_rate_ceiling([0, 1, 2]) == 1.0 and win_rate_ceiling([4, 4]) == 0.5
    assert math.isnan(win_rate_ceiling([]))
