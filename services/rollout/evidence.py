"""The live evidence on each policy version, and the gate's decision on a canary against the stable
version.

    book = EvidenceBook(versions={"policy-0007", "policy-0008"})
    book.observe_feedback(event)          # FeedbackEvent from rlhf.feedback
    book.observe_completion(event)        # CompletionEvent from rlhf.completions (source "user")
    decision = decide(book.of("policy-0008"), book.of("policy-0007"), book.side_by_side("policy-0008", "policy-0007"),
                      settings, age_s=...)

Signals, each an observation in [0, 1] per rating or request:
- **thumbs**: 1 for up, 0 for down;
- **likert**: (score - 1) / 6;
- **side by side**: a pairwise rating (or a ranking) of a canary answer against a stable answer to the
  same request: 1 when the canary's won, 0 when it lost, 1/2 for a tie;
- **errors**: 1 for a completion that ended in an error (finish_reason "error"), else 0; its rule is
  reversed (a *higher* rate is worse), so the gate tests 1 - error;
- latency and answer length are reported as evidence (median, p90) and latency is guarded by a
  ratio, not tested: they are not bounded observations. The guard compares the median time to the
  first token and the median time per output token after it (TPOT), which do not depend on how long
  the answers are (a canary that learned longer or shorter answers is not slower or faster for it;
  the length is reported), once each arm has ``min_latency_samples`` completions (a swapped engine's
  first requests and a shared machine's noise make a median of a few dozen requests move by half).

Only a principal's latest vote on a target counts (a revision replaces the earlier vote), as the
reward model's training does. The map of live votes is bounded (``max_votes``; older entries are
forgotten first, counted).

The decision (``decide``) splits alpha across the signals that have data (Bonferroni), so the
chance of any false rollback stays at most alpha; a rollback on any signal rolls back; a promotion
needs the primary signal (thumbs, else Likert, else side by side) to conclude non-inferiority with
at least ``min_ratings`` ratings, no signal pointing to a rollback, and the latency ratio within
its bound; a canary older than ``timeout_s`` without a conclusion is rolled back.
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field
from typing import Any

from services.rollout.confidence import Verdict, verdict, win_rate_verdict
from shared.events import CompletionEvent, FeedbackEvent

LATENCY_SAMPLES = 2000
"""Recent request latencies kept per version (a bounded window) for the medians."""


@dataclass
class SignalCount:
    """Observations in [0, 1]: their sum and how many."""

    total: float = 0.0
    n: int = 0

    def add(self, x: float, times: int = 1) -> None:
        self.total += x * times
        self.n += times

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None


@dataclass
class VersionEvidence:
    """What users said about one version, and how its requests went."""

    thumbs: SignalCount = field(default_factory=SignalCount)
    likert: SignalCount = field(default_factory=SignalCount)
    ok: SignalCount = field(default_factory=SignalCount)
    """1 per completion without error, 0 per error."""
    latency_s: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES))
    ttft_s: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES))
    """Each completion's time to its first token."""
    tpot_s: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES))
    """Each completion's time per output token after the first (completions of 2 tokens or more)."""
    tokens: SignalCount = field(default_factory=SignalCount)
    """Sum and count of completion lengths in tokens (not a [0, 1] signal: reported only)."""

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latency_s)
        return {
            "thumbs_up_rate": self.thumbs.mean,
            "thumbs": self.thumbs.n,
            "likert_mean": None if self.likert.mean is None else 1 + 6 * self.likert.mean,
            "likerts": self.likert.n,
            "completions": self.ok.n,
            "error_rate": None if self.ok.mean is None else 1 - self.ok.mean,
            "latency_p50_s": statistics.median(lat) if lat else None,
            "latency_p90_s": lat[int(0.9 * (len(lat) - 1))] if lat else None,
            "ttft_p50_s": statistics.median(self.ttft_s) if self.ttft_s else None,
            "tpot_p50_s": statistics.median(self.tpot_s) if self.tpot_s else None,
            "mean_tokens": None if not self.tokens.n else self.tokens.total / self.tokens.n,
        }


def time_per_output_token(first_token_s: float, total_s: float, tokens: int) -> float:
    """TPOT: (total - time to first token) / (tokens - 1), the decode time per token after the first
    (as vLLM's benchmarks define it); ``tokens`` >= 2."""
    return max(0.0, total_s - first_token_s) / (tokens - 1)


def thumb_value(thumb: str | None) -> float | None:
    """1 for "up", 0 for "down", None otherwise."""
    return {"up": 1.0, "down": 0.0}.get(thumb or "")


def likert_value(score: int | None) -> float | None:
    """(score - 1) / 6 for a score from 1 to 7, None otherwise."""
    return None if score is None or not 1 <= score <= 7 else (score - 1) / 6


def pairwise_value(preferred: str | None) -> float | None:
    """The first response's outcome in a pairwise rating: 1 if "a" won, 0 if "b", 1/2 for a tie."""
    return {"a": 1.0, "b": 0.0, "tie": 0.5}.get(preferred or "")


def ranking_outcome(rank_a: int, rank_b: int) -> float:
    """Response a's outcome against b in a ranking (rank 1 = best): 1 if better, 0 if worse, 1/2 if tied."""
    return 1.0 if rank_a < rank_b else 0.0 if rank_a > rank_b else 0.5


@dataclass
class _Vote:
    """A principal's live vote on a target, as counted."""

    revision: int
    single: tuple[str, str, float] | None = None
    """(version, signal name, value) of a thumb or Likert rating."""
    pairs: list[tuple[str, str, float]] = field(default_factory=list)
    """(version of the first, version of the second, first's outcome) of every compared pair."""


class EvidenceBook:
    """Evidence per version for a fixed set of watched versions (the stable one and the canary)."""

    def __init__(self, versions: set[str] | None = None, *, max_votes: int = 200_000):
        self.watched: set[str] = set(versions or ())
        self.max_votes = max_votes
        self._evidence: dict[str, VersionEvidence] = {}
        self._votes: collections.OrderedDict[tuple[str, str], _Vote] = collections.OrderedDict()
        self._sxs: dict[tuple[str, str], SignalCount] = {}
        self.forgotten_votes = 0
        """Live votes dropped from the bounded map (a later revision of one of them counts twice)."""

    def watch(self, versions: set[str]) -> None:
        """Watch exactly these versions from now on; evidence on others is dropped."""
        self.watched = set(versions)
        self._evidence = {v: e for v, e in self._evidence.items() if v in self.watched}
        self._sxs = {k: c for k, c in self._sxs.items() if k[0] in self.watched and k[1] in self.watched}

    def reset(self) -> None:
        """Forget every observation and vote (a new canary period starts: both arms are compared on
        what users said since then, exactly what a restarted service reads back from Kafka)."""
        self._evidence.clear()
        self._votes.clear()
        self._sxs.clear()
        self.forgotten_votes = 0

    @property
    def votes_held(self) -> int:
        """Live votes remembered (at most ``max_votes``)."""
        return len(self._votes)

    def of(self, version: str) -> VersionEvidence:
        return self._evidence.setdefault(version, VersionEvidence())

    def side_by_side(self, first: str, second: str) -> SignalCount:
        """``first``'s outcomes against ``second`` (1 = first won) over every compared pair."""
        return self._sxs.setdefault((first, second), SignalCount())

    # --- observing ---------------------------------------------------------------------------------

    def observe_completion(self, ev: CompletionEvent) -> None:
        if ev.source != "user" or ev.policy_version not in self.watched or len(ev.policy_versions) > 1:
            return
        e = self.of(ev.policy_version)
        e.ok.add(0.0 if ev.finish_reason == "error" else 1.0)
        e.latency_s.append(ev.timings.total_s)
        e.ttft_s.append(ev.timings.first_token_s)
        if len(ev.token_ids) >= 2:
            e.tpot_s.append(time_per_output_token(ev.timings.first_token_s, ev.timings.total_s, len(ev.token_ids)))
        e.tokens.add(len(ev.token_ids))

    def observe_feedback(self, ev: FeedbackEvent) -> None:
        key = (ev.user_id, ev.target)
        old = self._votes.get(key)
        if old is not None and ev.revision <= old.revision:
            return
        vote = self._vote_of(ev)
        if old is not None:
            self._count(old, -1)
            self._votes.move_to_end(key)
        self._votes[key] = vote
        self._count(vote, +1)
        while len(self._votes) > self.max_votes:
            self._votes.popitem(last=False)
            self.forgotten_votes += 1

    def _vote_of(self, ev: FeedbackEvent) -> _Vote:
        versions = [r.policy_version for r in ev.responses]
        vote = _Vote(ev.revision)
        if ev.kind == "thumb" and versions:
            value = thumb_value(ev.thumb)
            if value is not None:
                vote.single = (versions[0], "thumbs", value)
        elif ev.kind == "likert" and versions:
            value = likert_value(ev.score)
            if value is not None:
                vote.single = (versions[0], "likert", value)
        elif ev.kind == "pairwise" and len(versions) == 2:
            value = pairwise_value(ev.preferred)
            if value is not None and versions[0] != versions[1]:
                vote.pairs.append((versions[0], versions[1], value))
        elif ev.kind == "ranking":
            ranks = ev.ranks if ev.ranks is not None else list(range(1, len(versions) + 1))
            for i in range(len(versions)):
                for j in range(i + 1, len(versions)):
                    if versions[i] != versions[j]:
                        vote.pairs.append((versions[i], versions[j], ranking_outcome(ranks[i], ranks[j])))
        return vote

    def _count(self, vote: _Vote, sign: int) -> None:
        if vote.single is not None:
            version, signal, value = vote.single
            if version in self.watched:
                getattr(self.of(version), signal).add(value, sign)
        for a, b, outcome in vote.pairs:
            if a in self.watched and b in self.watched:
                self.side_by_side(a, b).add(outcome, sign)
                self.side_by_side(b, a).add(1.0 - outcome, sign)


@dataclass(frozen=True)
class GateSettings:
    alpha: float = 0.05
    """Chance of a false rollback (an equal canary) or a false promotion (one worse than the margin)."""
    margin: float = 0.05
    """Non-inferiority margin on every [0, 1] signal (e.g. 5 points of thumbs-up rate)."""
    rho: float = 25.0
    """Where the confidence sequences are tightest (about 4 * rho observations per arm)."""
    min_ratings: int = 30
    """Ratings of the canary on its primary signal before it may be promoted."""
    max_latency_ratio: float = 1.5
    """Roll back when the canary's median time to first token, or its median time per output token
    after the first, exceeds the stable one's by this factor (with at least ``min_latency_samples``
    completions each)."""
    min_latency_samples: int = 100
    """Completions of each arm before the latency ratio is judged."""
    timeout_s: float = 3600.0
    """Roll back a canary without a conclusion after this long."""


@dataclass(frozen=True)
class GateDecision:
    action: str
    """"rollback", "promote" or "continue"."""
    reason: str
    evidence: dict[str, Any]
    """Per signal: the canary's and the stable version's counts and the interval the verdict used."""


PRIMARY = ("thumbs", "likert", "side_by_side")


def _signal_evidence(pair: tuple[SignalCount, SignalCount | None], v: Verdict) -> dict[str, Any]:
    canary, stable = pair
    return {
        "canary_n": canary.n,
        "canary_mean": canary.mean,
        "stable_n": stable.n if stable is not None else None,
        "stable_mean": stable.mean if stable is not None else None,
        "difference": [round(v.interval.low, 4), round(v.interval.high, 4)],
        "verdict": v.decision,
    }


def decide(
    canary: VersionEvidence, stable: VersionEvidence, sxs: SignalCount, settings: GateSettings, *, age_s: float
) -> GateDecision:
    """The live gate's decision on a canary (see the module docstring)."""
    signals: dict[str, tuple[SignalCount, SignalCount | None]] = {
        "thumbs": (canary.thumbs, stable.thumbs),
        "likert": (canary.likert, stable.likert),
        "side_by_side": (sxs, None),
        "no_error": (canary.ok, stable.ok),
    }
    live = {name: pair for name, pair in signals.items() if pair[0].n and (pair[1] is None or pair[1].n)}
    alpha = settings.alpha / max(1, len(live))
    verdicts: dict[str, Verdict] = {}
    for name, (c, s) in live.items():
        if s is None:
            verdicts[name] = win_rate_verdict(c.total, c.n, alpha=alpha, margin=settings.margin, rho=settings.rho)
        else:
            verdicts[name] = verdict(c.total, c.n, s.total, s.n, alpha=alpha, margin=settings.margin, rho=settings.rho)
    evidence: dict[str, Any] = {name: _signal_evidence(live[name], v) for name, v in verdicts.items()}
    evidence["alpha_per_signal"] = alpha
    evidence["canary"] = canary.summary()
    evidence["stable"] = stable.summary()
    worse = [name for name, v in verdicts.items() if v.decision == "rollback"]
    if worse:
        return GateDecision("rollback", f"worse than the stable version on {', '.join(worse)}", evidence)
    for key, label, c_n, s_n in (
        ("ttft_p50_s", "time to first token", len(canary.ttft_s), len(stable.ttft_s)),
        ("tpot_p50_s", "time per output token", len(canary.tpot_s), len(stable.tpot_s)),
    ):
        c_lat, s_lat = evidence["canary"][key], evidence["stable"][key]
        if (
            c_lat is not None
            and s_lat
            and min(c_n, s_n) >= settings.min_latency_samples
            and c_lat > settings.max_latency_ratio * s_lat
        ):
            return GateDecision(
                "rollback",
                f"median {label} {1000 * c_lat:.1f} ms > {settings.max_latency_ratio} x {1000 * s_lat:.1f} ms",
                evidence,
            )
    primary = next((name for name in PRIMARY if name in verdicts), None)
    if primary is not None and verdicts[primary].decision == "promote":
        n = live[primary][0].n
        if n >= settings.min_ratings:
            return GateDecision("promote", f"non-inferior on {primary} with {n} ratings", evidence)
    if age_s > settings.timeout_s:
        return GateDecision("rollback", f"no conclusion within {settings.timeout_s:.0f} s", evidence)
    return GateDecision("continue", "collecting evidence", evidence)
