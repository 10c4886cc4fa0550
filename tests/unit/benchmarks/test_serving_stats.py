"""The pure figures of the serving benchmark (tests/benchmarks/serving_stats.py): percentiles, the
`vllm bench serve`-style TTFT/TPOT/ITL from chunk timestamps, ratios and the trainer's throughput."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.benchmarks.serving_stats import (
    TARGETS,
    RequestTiming,
    distribution_ms,
    labelled,
    meets,
    metric_deltas,
    parse_metrics,
    percentile,
    ratio,
    request_timing,
    serve_style_figures,
    trainer_throughput,
)


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], [0.1 * i**2 for i in range(37)]])
@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpys_linear_interpolation(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_none() -> None:
    assert percentile([], 50) is None


def test_percentile_interpolates_between_ranks() -> None:
    # rank 0.9 * 3 = 2.7: 30 + 0.7 * (40 - 30)
    assert percentile([40.0, 10.0, 30.0, 20.0], 90) == pytest.approx(37.0)


def test_distribution_is_in_milliseconds() -> None:
    d = distribution_ms([0.1, 0.2, 0.3])
    assert d["n"] == 3
    assert d["mean"] == pytest.approx(200.0)
    assert d["p50"] == pytest.approx(200.0)
    assert d["p90"] == pytest.approx(280.0)
    assert d["std"] == pytest.approx(math.sqrt(2 / 3) * 100)
    empty = distribution_ms([])
    assert empty == {"n": 0, "mean": None, "std": None, "p50": None, "p90": None, "p99": None}


def test_request_timing_from_chunk_arrivals() -> None:
    # sent at 10.0; content chunks at 10.5, 10.6, 10.9 carrying 5 tokens in all; stream closed at 11.0
    t = request_timing(10.0, 10.5, [10.5, 10.6, 10.9], completion_tokens=5, t_end=11.0)
    assert t.ttft == pytest.approx(0.5)
    assert t.itls == pytest.approx((0.1, 0.3))
    assert t.tpot == pytest.approx(0.4 / 4)  # (10.9 - 10.5) / (5 - 1): independent of the chunking
    assert t.e2el == pytest.approx(1.0)


def test_request_timing_orders_the_arrivals() -> None:
    t = request_timing(0.0, 0.2, [0.5, 0.2, 0.3], completion_tokens=3, t_end=0.6)
    assert t.itls == pytest.approx((0.1, 0.2))
    assert t.tpot == pytest.approx(0.15)


def test_one_token_or_no_content_has_no_tpot() -> None:
    one = request_timing(0.0, 0.2, [0.2], completion_tokens=1, t_end=0.3)
    assert one.tpot is None and one.itls == ()
    # only the end-of-sequence token: the finish chunk counted as first, no content chunk at all
    eos = request_timing(0.0, 0.2, [], completion_tokens=2, t_end=0.3)
    assert eos.tpot is None and eos.ttft == pytest.approx(0.2)
    never = request_timing(0.0, None, [], completion_tokens=0, t_end=0.3)
    assert never.ttft is None


def test_serve_style_figures_pool_every_gap() -> None:
    timings = [
        RequestTiming(ttft=0.1, tpot=0.01, itls=(0.01, 0.01, 0.01), e2el=1.0),
        RequestTiming(ttft=0.3, tpot=None, itls=(), e2el=2.0),
        RequestTiming(ttft=None, tpot=0.03, itls=(0.05,), e2el=3.0),
    ]
    f = serve_style_figures(timings)
    assert f["ttft_ms"]["n"] == 2 and f["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert f["tpot_ms"]["n"] == 2 and f["tpot_ms"]["mean"] == pytest.approx(20.0)
    assert f["itl_ms"]["n"] == 4 and f["itl_ms"]["p50"] == pytest.approx(10.0)
    assert f["itl_ms"]["p99"] == pytest.approx(float(np.percentile([10, 10, 10, 50], 99)))
    assert f["e2el_ms"]["p50"] == pytest.approx(2000.0)


def test_ratio_refuses_nothing() -> None:
    assert ratio(3.0, 4.0) == pytest.approx(0.75)
    assert ratio(None, 4.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


METRICS_BEFORE = """\
# HELP rlhf_trainer_rollouts_total Rollouts trained on
# TYPE rlhf_trainer_rollouts_total counter
rlhf_trainer_rollouts_total 32.0
rlhf_trainer_rollouts_created 1.7e+09
rlhf_trainer_iterations_total 2.0
rlhf_trainer_paused 0.0
rlhf_trainer_iteration_seconds_bucket{le="1.0",phase="sampling"} 1.0
rlhf_trainer_iteration_seconds_sum{phase="sampling"} 3.5
rlhf_trainer_iteration_seconds_count{phase="sampling"} 2.0
rlhf_inference_requests_total 7.0
"""

METRICS_AFTER = """\
rlhf_trainer_rollouts_total 96.0
rlhf_trainer_iterations_total 6.0
rlhf_trainer_published_total 1.0
rlhf_trainer_paused 1.0
rlhf_trainer_rollouts_dropped_total{reason="stale"} 4.0
rlhf_trainer_iteration_seconds_bucket{le="1.0",phase="sampling"} 3.0
rlhf_trainer_iteration_seconds_sum{phase="sampling"} 9.5
rlhf_trainer_iteration_seconds_count{phase="sampling"} 6.0
rlhf_trainer_kl NaN
rlhf_trainer_user_wait_seconds_total{reason="users"} 12.5
rlhf_trainer_user_wait_seconds_total{reason="idle_budget"} 0.0
rlhf_trainer_user_load_state{state="full"} 0.0
rlhf_trainer_user_load_state{state="yielding"} 1.0
rlhf_inference_requests_total 9.0
"""


def test_parse_metrics_keeps_the_prefix_and_labels_and_drops_buckets() -> None:
    m = parse_metrics(METRICS_BEFORE, "rlhf_trainer_")
    assert m["rlhf_trainer_rollouts_total"] == 32.0
    assert m['rlhf_trainer_iteration_seconds_sum{phase="sampling"}'] == 3.5
    assert not any(k.startswith("rlhf_inference") or "_bucket" in k for k in m)
    assert "rlhf_trainer_rollouts_created" in m  # a gauge-like sample, kept: not cumulative


def test_metric_deltas_of_cumulative_samples_only() -> None:
    d = metric_deltas(parse_metrics(METRICS_BEFORE, "rlhf_trainer_"), parse_metrics(METRICS_AFTER, "rlhf_trainer_"))
    assert d == {
        "rlhf_trainer_rollouts_total": 64.0,
        "rlhf_trainer_iterations_total": 4.0,
        "rlhf_trainer_published_total": 1.0,  # absent before: counted from 0
        'rlhf_trainer_rollouts_dropped_total{reason="stale"}': 4.0,
        'rlhf_trainer_iteration_seconds_sum{phase="sampling"}': 6.0,
        'rlhf_trainer_iteration_seconds_count{phase="sampling"}': 4.0,
        'rlhf_trainer_user_wait_seconds_total{reason="users"}': 12.5,
    }


def test_trainer_throughput_per_second_and_minute() -> None:
    before = parse_metrics(METRICS_BEFORE, "rlhf_trainer_")
    after = parse_metrics(METRICS_AFTER, "rlhf_trainer_")
    t = trainer_throughput(before, after, wall_s=32.0)
    assert t["rollouts"] == 64.0 and t["rollouts_per_s"] == pytest.approx(2.0)
    assert t["steps"] == 4.0 and t["steps_per_min"] == pytest.approx(7.5)
    assert t["published"] == 1.0
    assert t["gauges_after"]["rlhf_trainer_paused"] == 1.0
    assert math.isnan(t["gauges_after"]["rlhf_trainer_kl"])
    assert t["waited_s"] == {"users": 12.5}  # the idle budget did not move
    assert t["state_after"] == "yielding"
    idle = trainer_throughput(after, after, wall_s=0.0)
    assert idle["rollouts"] == 0.0 and idle["rollouts_per_s"] is None and idle["deltas"] == {}
    assert idle["waited_s"] == {}
    old = trainer_throughput({}, parse_metrics("rlhf_trainer_rollouts_total 3.0"), wall_s=1.0)
    assert old["state_after"] is None and old["waited_s"] == {}  # a trainer that does not yield


def test_labelled_picks_one_metric_by_label() -> None:
    m = {'a_total{reason="x"}': 1.0, 'a_total{reason="y",k="v"}': 2.0, 'ab_total{reason="z"}': 3.0, "a_total": 4.0}
    assert labelled(m, "a_total", "reason") == {"x": 1.0, "y": 2.0}


def test_meets_compares_either_way_and_abstains_without_a_value() -> None:
    assert meets(0.9, ">=", 0.85) is True
    assert meets(0.85, ">=", 0.85) is True
    assert meets(0.8, ">=", 0.85) is False
    assert meets(1.2, "<=", 1.2) is True
    assert meets(1.3, "<=", 1.2) is False
    assert meets(None, "<=", 1.2) is None
    with pytest.raises(ValueError, match="unknown comparison"):
        meets(1.0, ">", 1.0)


def test_targets_name_known_figures() -> None:
    figures = {"tokens_per_s", "latency_p99", "ttft_p50"}
    assert all(
        server.startswith("ours-") and fig in figures and cmp in (">=", "<=") for server, _, fig, cmp, _ in TARGETS
    )
    assert ("ours-loop", 64, "tokens_per_s", ">=", 0.85) in TARGETS
