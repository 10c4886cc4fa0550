"""The demo's report (flywheel/demo/report.py): rolling rates, thumbs-up per policy version, the report files."""

from __future__ import annotations

from flywheel.demo.report import rolling_rate, thumbs_up_by_version, trust_counts, write_report


def test_rolling_rate_uses_a_trailing_window():
    pts = [(0.0, True), (1.0, False), (2.0, False), (10.0, True)]
    assert rolling_rate(pts, 5.0) == [(0.0, 1.0), (1.0, 0.5), (2.0, 1 / 3), (10.0, 1.0)]


def _rec(t, version, ups, kind="thumb", status=200):
    return {
        "t": t,
        "user": "u",
        "kind": kind,
        "prompt": "What is 1 plus 1?",
        "responses": ["x"] * len(ups),
        "response_ids": ["r"] * len(ups),
        "policy_version": version,
        "gold_scores": [4 if u else 0 for u in ups],
        "gold_thumbs_up": ups,
        "chat_latency_s": 0.1,
        "feedback_status": status,
        "error": "",
        "rating": {},
    }


def test_thumbs_up_by_version_counts_every_served_response_in_version_order():
    recs = [
        _rec(0, "policy-0010", [True]),
        _rec(1, "policy-0002", [False, True, False]),
        _rec(2, "policy-0002", [True]),
        _rec(3, "", [], kind="error", status=0),
    ]
    rates = thumbs_up_by_version(recs)
    assert [r.version for r in rates] == ["policy-0002", "policy-0010"]
    assert (rates[0].responses, rates[0].thumbs_up, rates[0].rate) == (4, 2, 0.5)
    assert rates[1].rate == 1.0 and rates[1].low < 1.0


def test_write_report_makes_markdown_and_plots(tmp_path):
    recs = [_rec(i, "policy-0001" if i < 5 else "policy-0002", [i >= 5]) for i in range(10)]
    policies = [
        {"version": "policy-0001", "parent": None, "created_at": 0.0, "metrics": {}, "extra": {}},
        {"version": "policy-0002", "parent": "policy-0001", "created_at": 104.0, "metrics": {"kl": 0.3}, "extra": {}},
    ]
    rms = [
        {
            "version": "rm-0001",
            "parent": "policy-0001",
            "created_at": 0.0,
            "metrics": {"heldout_accuracy": 0.8},
            "extra": {},
        }
    ]
    ppo = [
        {"t": 1.0, "step": 1, "mean_reward": -0.2, "kl": 0.0, "entropy": 1.0},
        {"t": 2.0, "step": 2, "mean_reward": 0.3, "kl": 0.4, "entropy": 0.9},
    ]
    summary = write_report(tmp_path, recs, policies, rms, ppo, started_at=100.0, duration_s=10.0)
    assert summary["thumbs_up_rise_pp"] == 100.0
    assert summary["policy_versions_published"] == ["policy-0002"]
    for name in (
        "report.md",
        "thumbs_up_by_policy.png",
        "rm_accuracy.png",
        "ppo_reward_kl.png",
        "serving_timeline.png",
        "data.json",
        "interactions.jsonl",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "report.md").read_text()
    assert "| policy-0002 | 5 | 100.0% |" in md and "+100.0 percentage points" in md


REWARD_METRICS = """\
# HELP rlhf_reward_learner_raters Principals with ratings, by status
# TYPE rlhf_reward_learner_raters gauge
rlhf_reward_learner_raters{status="ok"} 3.0
rlhf_reward_learner_raters{status="quarantined"} 1.0
# HELP rlhf_reward_learner_comparisons_held_back Comparisons the last round left out
# TYPE rlhf_reward_learner_comparisons_held_back gauge
rlhf_reward_learner_comparisons_held_back{reason="capped",slice="train"} 40.0
rlhf_reward_learner_comparisons_held_back{reason="capped",slice="heldout"} 2.0
rlhf_reward_learner_comparisons_held_back{reason="quarantined",slice="train"} 16.0
rlhf_reward_learner_comparisons_held_back{reason="quarantined",slice="heldout"} 8.0
"""
GATEWAY_METRICS = """\
# HELP rlhf_gateway_rate_limit_total Requests by rate-limit outcome
# TYPE rlhf_gateway_rate_limit_total counter
rlhf_gateway_rate_limit_total{limit="chat",outcome="allowed"} 90.0
rlhf_gateway_rate_limit_total{limit="chat",outcome="refused"} 4.0
rlhf_gateway_rate_limit_total{limit="feedback",outcome="refused"} 3.0
"""


def test_trust_counts_from_the_users_records_and_the_services_metrics():
    recs = [_rec(i, "policy-0001", [True]) for i in range(4)]
    recs[0]["feedback_status"] = 429
    recs[1] |= {"kind": "error", "error": "RateLimitError: Error code: 429 - too many requests"}
    counts = trust_counts(recs, {"reward": REWARD_METRICS, "gateway": GATEWAY_METRICS})
    assert counts == {
        "ratings_rate_limited": 1,
        "chats_rate_limited": 1,
        "quarantined_principals": 1.0,
        "comparisons_held_back_quarantined": 24.0,
        "comparisons_held_back_capped": 42.0,
        "live_prompts_capped": None,  # the trainer's metrics were not read
        "requests_rate_limited": 7.0,
    }


def test_the_report_shows_the_limits_per_principal(tmp_path):
    recs = [_rec(i, "policy-0001", [True]) for i in range(3)]
    summary = write_report(tmp_path, recs, [], [], [], 0.0, 1.0, metrics={"reward": REWARD_METRICS})
    assert summary["limits_per_principal"]["quarantined_principals"] == 1.0
    md = (tmp_path / "report.md").read_text()
    assert "## Limits per principal" in md
    assert "Quarantined raters: 1; their comparisons left out of the last reward model round: 24." in md
    assert "Capped: 42 comparisons waiting" in md and "n/a live prompts" in md
