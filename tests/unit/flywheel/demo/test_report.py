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


def test_side_by_side_responses_count_for_the_version_that_wrote_each():
    sxs = _rec(0, "policy-0003", [False, True]) | {"choice_versions": ["policy-0003", "policy-0002"]}
    rates = {r.version: (r.responses, r.thumbs_up) for r in thumbs_up_by_version([sxs])}
    assert rates == {"policy-0002": (1, 1), "policy-0003": (1, 0)}


def test_the_report_shows_the_gate_and_the_canaries(tmp_path):
    from tests.unit.flywheel.demo.test_canaries import EVENTS, T0, gate, rec

    recs = [rec(20, ["policy-0002"]) | {"prompt": "What is 1 plus 1?"}, rec(130, ["policy-0003", "policy-0002"])]
    for r in recs:
        r |= {"user": "u", "response_ids": ["r"] * len(r["responses"]), "gold_scores": [4] * len(r["responses"])}
        r |= {"chat_latency_s": 0.1, "feedback_status": 200, "error": "", "rating": {}, "prompt": "What is 1 plus 1?"}
    policies = [
        {"version": "policy-0002", "parent": "policy-0001", "created_at": T0 + 5, "metrics": {"heldout_samples": 4.0}}
    ]
    gates = [gate(5, published=True, compared=False), gate(10, refused_by="entry:checks:sums", same=True)]
    summary = write_report(tmp_path, recs, policies, [], [], T0, 200.0, gates=gates, rollout=EVENTS)
    assert summary["gate"]["differed_share"] == 0.0 and summary["heldout_samples"] == [4]
    assert [c["outcome"] for c in summary["canaries"]] == ["promoted", "rolled_back", "running"]
    assert (tmp_path / "traffic_share.png").stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    assert "## The trainer's publish gate" in md and "differed from the baseline's in 0.0%" in md
    assert "Refused by: entry:checks:sums 1." in md and "Held-out answers sampled per prompt: 4" in md
    assert "## Canaries" in md and "| policy-0003 | rolled_back | worse than the stable version on thumbs | 40 |" in md
    assert "5% of 40" in md and "80% of 300" in md and "![Canary traffic share over time](traffic_share.png)" in md
    # With canaries off there is no canary section and no share plot.
    off = write_report(tmp_path / "off", recs, policies, [], [], T0, 200.0)
    assert off["canaries"] is None and not (tmp_path / "off" / "traffic_share.png").exists()
    assert "## Canaries" not in (tmp_path / "off" / "report.md").read_text()


def test_the_sabotage_section_is_appended_to_the_report(tmp_path):
    from flywheel.demo.canaries import sabotage_outcome
    from flywheel.demo.report import append_to_report, sabotage_lines
    from tests.unit.flywheel.demo.test_canaries import EVENTS, T0, rec

    outcome = sabotage_outcome([rec(130, ["policy-0003"], conversation="x")], EVENTS, "policy-0003", T0 + 115)
    (tmp_path / "report.md").write_text("# report\n")
    append_to_report(tmp_path, sabotage_lines(outcome))
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# report\n") and "## Sabotage: a bad candidate" in md
    assert "| verdict | rolled back (automatically): worse than the stable version on thumbs |" in md
    assert "| canary start to rollback | 40.0 s |" in md and "| answers it served | 1 |" in md
    never = sabotage_lines(sabotage_outcome([], EVENTS, "policy-0042"))
    assert "policy-0042 never became the canary" in never[-1]
    assert "No bad candidate was published: Kafka down" in sabotage_lines({"version": "", "error": "Kafka down"})[-1]
