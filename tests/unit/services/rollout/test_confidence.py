"""The live gate's confidence sequences: the radius formula, and the error rates of the decisions
on simulated Bernoulli streams watched after every observation (optional stopping included)."""

from __future__ import annotations

import math
import random

import pytest

from services.rollout.confidence import Interval, difference, mean_sequence, radius, verdict, win_rate_verdict

ALPHA, MARGIN, RHO = 0.05, 0.05, 25.0


def test_radius_is_the_normal_mixture_boundary_over_n():
    n, alpha, rho = 100, 0.05, 25.0
    v = 0.25 * n
    assert radius(n, alpha, rho) == pytest.approx(math.sqrt((v + rho) * math.log((v + rho) / (rho * 0.025**2))) / n)
    assert radius(0, alpha, rho) == math.inf


def test_radius_shrinks_with_more_data_and_grows_with_confidence():
    assert radius(10_000, 0.05, RHO) < radius(1_000, 0.05, RHO) < radius(100, 0.05, RHO)
    assert radius(1_000, 0.01, RHO) > radius(1_000, 0.05, RHO)


@pytest.mark.parametrize("bad", [(10, 0.0, 1.0), (10, 1.0, 1.0), (10, 0.05, 0.0)])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        radius(*bad)


def test_difference_bounds_every_pair_of_means_in_the_two_intervals():
    d = difference(Interval(0.6, 0.7), Interval(0.4, 0.5))
    assert (d.low, d.high) == pytest.approx((0.1, 0.3))


def test_an_arm_without_data_knows_nothing():
    assert mean_sequence(0, 0, ALPHA, RHO) == Interval(0.0, 1.0)


def run(p_canary: float, p_stable: float, rng: random.Random, *, steps: int, canary_share: float) -> str:
    """Watch the gate after every observation; the first decision taken, or "continue"."""
    c_tot = c_n = s_tot = s_n = 0
    for _ in range(steps):
        if rng.random() < canary_share:
            c_n += 1
            c_tot += rng.random() < p_canary
        else:
            s_n += 1
            s_tot += rng.random() < p_stable
        v = verdict(c_tot, c_n, s_tot, s_n, alpha=ALPHA, margin=MARGIN, rho=RHO)
        if v.decision != "continue":
            return v.decision
    return "continue"


def test_an_equal_canary_is_rolled_back_at_most_alpha_of_the_time():
    rng = random.Random(7)
    decisions = [run(0.6, 0.6, rng, steps=3_000, canary_share=0.2) for _ in range(300)]
    false_rollbacks = decisions.count("rollback") / len(decisions)
    assert false_rollbacks <= ALPHA
    assert decisions.count("promote") > 0  # it can also conclude non-inferiority


def test_a_canary_worse_than_the_margin_is_promoted_at_most_alpha_of_the_time():
    rng = random.Random(11)
    decisions = [run(0.6 - 2 * MARGIN, 0.6, rng, steps=6_000, canary_share=0.2) for _ in range(200)]
    false_promotions = decisions.count("promote") / len(decisions)
    assert false_promotions <= ALPHA
    # ...and with 1,200 canary ratings it has usually caught it (43% of runs by 600, 96% by 1,200).
    assert decisions.count("rollback") / len(decisions) > 0.8


def test_a_much_worse_canary_is_rolled_back_quickly_and_a_better_one_promoted():
    rng = random.Random(3)
    worse = [run(0.3, 0.7, rng, steps=2_000, canary_share=0.2) for _ in range(50)]
    better = [run(0.8, 0.6, rng, steps=4_000, canary_share=0.2) for _ in range(50)]
    assert worse.count("rollback") == 50
    assert better.count("promote") >= 45


def test_side_by_side_win_rates_use_one_half_as_the_stable_rate():
    assert win_rate_verdict(20, 200, alpha=ALPHA, margin=MARGIN, rho=RHO).decision == "rollback"
    assert win_rate_verdict(150, 200, alpha=ALPHA, margin=MARGIN, rho=RHO).decision == "promote"
    assert win_rate_verdict(9, 20, alpha=ALPHA, margin=MARGIN, rho=RHO).decision == "continue"
