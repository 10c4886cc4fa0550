"""Always-valid confidence sequences for the live gate: a decision may be taken the moment the
evidence is there, however often the numbers are looked at, without inflating the error rates.

A fixed-sample test checked after every rating would reject a true null far more often than its
level says (optional stopping). A *confidence sequence* instead holds at all times at once:
P(for all t: mu in CS_t) >= 1 - alpha, so watching it continuously and stopping whenever it excludes
a value is valid. (Howard, Ramdas, McAuliffe, Sekhon: "Time-uniform, nonparametric, nonasymptotic
confidence sequences", Ann. Statist. 2021.)

**One arm.** Observations x_1..x_n in [0, 1] (a thumb: 0/1; a Likert score s: (s - 1) / 6) are
sigma-sub-Gaussian with sigma^2 = 1/4 around their mean mu. With S_n = sum(x_i - mu) and the
variance process V_n = sigma^2 n, Robbins' normal-mixture boundary (mixture variance rho) gives

    P( exists n: S_n >= sqrt((V_n + rho) * log((V_n + rho) / (rho * a^2))) ) <= a,

so the two-sided sequence at level a is  mean_n +- u(V_n) / n  with that boundary at a/2 per side
(``radius``). rho sets where the sequence is tightest (around n ~ rho / sigma^2 observations).

**Two arms.** For the canary c against the stable version s, each arm gets its sequence at level
alpha / 2; by the union bound both hold at all times with probability >= 1 - alpha, and then

    mu_c - mu_s  in  [L_c - U_s, U_c - L_s]        (``difference``)

holds at all times too: a conservative but valid sequence for the difference that needs no pairing
and no equal traffic split (the canary takes a small share).

**The decision** (``verdict``), with a non-inferiority margin delta >= 0:
- roll back as soon as U_c - L_s < 0: the canary is worse, with confidence 1 - alpha;
- promote as soon as L_c - U_s > -delta: the canary is no worse than the stable version by more
  than delta, with confidence 1 - alpha;
- otherwise keep watching (a timeout elsewhere rolls back a canary whose evidence never comes).
With a true difference of 0, a rollback needs the sequence to miss the truth: P <= alpha. With a
true difference below -delta, a promotion does too: P <= alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SIGMA2 = 0.25
"""Variance proxy of an observation in [0, 1] (Hoeffding's lemma: (1 - 0)^2 / 4)."""


def radius(n: int, alpha: float, rho: float) -> float:
    """Half-width of the two-sided confidence sequence of a mean of ``n`` observations in [0, 1],
    valid at all n at once with probability >= 1 - alpha:

        u(V) / n,   u(V) = sqrt((V + rho) * log((V + rho) / (rho * (alpha / 2)^2))),   V = n / 4.

    Infinite for n = 0.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    if n <= 0:
        return math.inf
    v = SIGMA2 * n
    return math.sqrt((v + rho) * math.log((v + rho) / (rho * (alpha / 2) ** 2))) / n


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"empty interval [{self.low}, {self.high}]")


def mean_sequence(total: float, n: int, alpha: float, rho: float) -> Interval:
    """The arm's confidence interval at ``n`` observations summing to ``total``, clipped to [0, 1]."""
    if n <= 0:
        return Interval(0.0, 1.0)
    mean = total / n
    r = radius(n, alpha, rho)
    return Interval(max(0.0, mean - r), min(1.0, mean + r))


def difference(canary: Interval, stable: Interval) -> Interval:
    """mu_canary - mu_stable lies in [L_c - U_s, U_c - L_s] whenever both arms' intervals hold."""
    return Interval(canary.low - stable.high, canary.high - stable.low)


@dataclass(frozen=True)
class Verdict:
    decision: str
    """"rollback", "promote" or "continue"."""
    interval: Interval
    """The always-valid interval of mu_canary - mu_stable it was taken on."""


def verdict(
    canary_total: float, canary_n: int, stable_total: float, stable_n: int, *, alpha: float, margin: float, rho: float
) -> Verdict:
    """The gate's decision on one signal, each arm at level alpha / 2 (see the module docstring)."""
    if margin < 0:
        raise ValueError(f"margin must not be negative, got {margin}")
    d = difference(
        mean_sequence(canary_total, canary_n, alpha / 2, rho), mean_sequence(stable_total, stable_n, alpha / 2, rho)
    )
    if d.high < 0:
        return Verdict("rollback", d)
    if d.low > -margin:
        return Verdict("promote", d)
    return Verdict("continue", d)


def win_rate_verdict(wins: float, n: int, *, alpha: float, margin: float, rho: float) -> Verdict:
    """The same rule for side-by-side comparisons of the canary against the stable version: each
    observation is 1 when the canary's answer won, 0 when it lost, 0.5 for a tie; the stable
    version's rate is 1/2 by definition. Rollback when the win rate is below 1/2 with confidence
    1 - alpha; promote when it is above 1/2 - margin."""
    if margin < 0:
        raise ValueError(f"margin must not be negative, got {margin}")
    cs = mean_sequence(wins, n, alpha, rho)
    d = Interval(cs.low - 0.5, cs.high - 0.5)
    if d.high < 0:
        return Verdict("rollback", d)
    if d.low > -margin:
        return Verdict("promote", d)
    return Verdict("continue", d)
