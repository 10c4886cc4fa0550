"""The pure figures of bench_serving.py: `vllm bench serve`-style latencies from chunk timestamps,
percentiles, ratios against vLLM's server, and the trainer's throughput from two /metrics scrapes.

Definitions (as vLLM's benchmarks/serve.py computes them, from the client's clock):

  TTFT  time to first token: send -> first chunk carrying content
  TPOT  time per output token after the first: (last content chunk - first) / (completion tokens - 1),
        for requests of more than one token
  ITL   inter-token latency: the gaps between a request's consecutive content chunks (per chunk, as
        vLLM counts it: a chunk carrying k tokens is one gap, so a server that sends several tokens
        per chunk has fewer, longer gaps; TPOT does not depend on the chunking)
  E2EL  end-to-end latency: send -> end of the stream
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PERCENTILES = (50, 90, 99)
"""The percentiles reported for TTFT, TPOT, ITL and E2EL (vLLM's bench serve reports 99 by default)."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` with linear interpolation between the closest ranks
    (numpy's default, which vLLM uses): rank r = q/100 * (n - 1), value = v[floor r] + (r - floor r) *
    (v[ceil r] - v[floor r]) over the sorted values; None for no values."""
    if not values:
        return None
    s = sorted(values)
    r = q / 100 * (len(s) - 1)
    lo = math.floor(r)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (r - lo) * (s[hi] - s[lo])


def distribution_ms(values_s: Sequence[float], qs: Iterable[int] = PERCENTILES) -> dict[str, float | None]:
    """Mean, standard deviation and percentiles of values in seconds, in milliseconds (vLLM's unit):
    {"n", "mean", "std", "p50", "p90", "p99"}; None figures for no values."""
    n = len(values_s)
    out: dict[str, float | None] = {"n": n}
    if n:
        mean = sum(values_s) / n
        out["mean"] = mean * 1e3
        out["std"] = math.sqrt(sum((v - mean) ** 2 for v in values_s) / n) * 1e3
    else:
        out["mean"] = out["std"] = None
    for q in qs:
        p = percentile(values_s, q)
        out[f"p{q}"] = None if p is None else p * 1e3
    return out


@dataclass(frozen=True)
class RequestTiming:
    """One streamed request's `bench serve` figures, in seconds."""

    ttft: float | None
    tpot: float | None
    itls: tuple[float, ...]
    e2el: float


def request_timing(
    t_send: float, t_first: float | None, content_times: Sequence[float], completion_tokens: int, t_end: float
) -> RequestTiming:
    """TTFT = t_first - t_send; ITL = consecutive differences of ``content_times`` (the arrival times
    of the chunks that carried content); TPOT = (last content time - first content time) /
    (completion_tokens - 1) when more than one token was generated and a content chunk arrived (None
    otherwise); E2EL = t_end - t_send."""
    times = sorted(content_times)
    itls = tuple(b - a for a, b in zip(times, times[1:]))
    tpot = None
    if completion_tokens > 1 and times:
        tpot = (times[-1] - times[0]) / (completion_tokens - 1)
    return RequestTiming(ttft=None if t_first is None else t_first - t_send, tpot=tpot, itls=itls, e2el=t_end - t_send)


def serve_style_figures(timings: Iterable[RequestTiming]) -> dict[str, dict[str, float | None]]:
    """The distributions vLLM's bench serve prints, over the successful requests of one level:
    {"ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"}, each {"n", "mean", "std", "p50", "p90", "p99"}.
    ITL pools every gap of every request (as vLLM does), so long answers weigh more."""
    ttft: list[float] = []
    tpot: list[float] = []
    itl: list[float] = []
    e2el: list[float] = []
    for t in timings:
        if t.ttft is not None:
            ttft.append(t.ttft)
        if t.tpot is not None:
            tpot.append(t.tpot)
        itl.extend(t.itls)
        e2el.append(t.e2el)
    return {
        "ttft_ms": distribution_ms(ttft),
        "tpot_ms": distribution_ms(tpot),
        "itl_ms": distribution_ms(itl),
        "e2el_ms": distribution_ms(e2el),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive (no ratio against nothing)."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


# --- the trainer's throughput from its /metrics ---------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str, prefix: str = "") -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value} for the samples whose name starts with
    ``prefix`` (comments, histogram buckets and unparsable values left out)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m or not m.group(1).startswith(prefix) or m.group(1).endswith("_bucket"):
            continue
        try:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        except ValueError:
            continue
    return out


def _is_cumulative(key: str) -> bool:
    name = key.split("{", 1)[0]
    return name.endswith(("_total", "_sum", "_count"))


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """after - before for every cumulative sample (counters' _total, histograms' _sum and _count),
    a sample missing before counting from 0 (a labelled counter appears on its first increment);
    samples that did not move are left out."""
    out = {}
    for key, value in after.items():
        if _is_cumulative(key):
            d = value - before.get(key, 0.0)
            if d:
                out[key] = d
    return out


ROLLOUTS = "rlhf_trainer_rollouts_total"
STEPS = "rlhf_trainer_iterations_total"
PUBLISHED = "rlhf_trainer_published_total"
WAITED = "rlhf_trainer_user_wait_seconds_total"
"""Seconds the trainer sent no rollouts, by reason (users: yielding to them; idle_budget)."""
STATE = "rlhf_trainer_user_load_state"
"""1 for the state the serving load leaves the trainer in (full, slowed, yielding, idle, unknown)."""


def labelled(samples: dict[str, float], name: str, label: str) -> dict[str, float]:
    """{label value: value} of the samples of metric ``name`` by one label, e.g.
    labelled(m, "x_total", "reason") -> {"users": 3.0} for the sample x_total{reason="users"}."""
    out = {}
    pattern = re.compile(rf'{label}="([^"]*)"')
    for key, value in samples.items():
        if key.split("{", 1)[0] == name:
            m = pattern.search(key)
            if m:
                out[m.group(1)] = value
    return out


def trainer_throughput(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    """The trainer's work between two scrapes ``wall_s`` apart: rollouts trained on
    (rlhf_trainer_rollouts_total), PPO steps (rlhf_trainer_iterations_total, one learner step each)
    and versions published, with rollouts/s = rollouts / wall_s and steps/min = 60 * steps / wall_s;
    ``deltas`` holds every cumulative rlhf_trainer_* sample that moved, ``gauges_after`` the other
    samples' values at the end (e.g. a paused or yielding state). Where the trainer yields to users:
    ``waited_s`` = seconds it sent no rollouts by reason (rlhf_trainer_user_wait_seconds_total), and
    ``state_after`` = the state whose rlhf_trainer_user_load_state is 1 at the end (None: none)."""
    deltas = metric_deltas(before, after)
    rollouts = deltas.get(ROLLOUTS, 0.0)
    steps = deltas.get(STEPS, 0.0)
    states = [state for state, v in labelled(after, STATE, "state").items() if v == 1]
    return {
        "wall_s": wall_s,
        "rollouts": rollouts,
        "steps": steps,
        "published": deltas.get(PUBLISHED, 0.0),
        "rollouts_per_s": rollouts / wall_s if wall_s > 0 else None,
        "steps_per_min": 60 * steps / wall_s if wall_s > 0 else None,
        "waited_s": labelled(deltas, WAITED, "reason"),
        "state_after": states[0] if len(states) == 1 else None,
        "deltas": deltas,
        "gauges_after": {k: v for k, v in after.items() if not _is_cumulative(k)},
    }


# --- the targets (#16) -----------------------------------------------------------------------

TARGETS = (
    # (server, clients, figure over vLLM's server's, comparison, bound)
    ("ours-loop", 64, "tokens_per_s", ">=", 0.85),
    ("ours-loop", 64, "latency_p99", "<=", 1.2),
    ("ours-loop", 64, "ttft_p50", "<=", 2.0),
    ("ours-loop", 8, "tokens_per_s", ">=", 0.7),
    ("ours-serving", 64, "tokens_per_s", ">=", 0.95),
    ("ours-serving", 8, "tokens_per_s", ">=", 0.95),
)
"""What the serving benchmark checks, as ratios against vLLM's own server in the same run: with the
whole loop running at least 0.85x its tokens/s at 64 clients with p99 latency at most 1.2x and TTFT
p50 at most 2x, at least 0.7x at 8 clients; the serving path alone at least 0.95x."""


def meets(value: float | None, comparison: str, bound: float) -> bool | None:
    """Whether ``value`` satisfies ``comparison`` (">=" or "<=") against ``bound``; None when there is
    no value to judge (the level or vLLM's server did not run)."""
    if value is None:
        return None
    if comparison == ">=":
        return value >= bound
    if comparison == "<=":
        return value <= bound
    raise ValueError(f"unknown comparison {comparison!r}")
