"""The demo's statistics, report grouping and the ratings simulated users send."""

from __future__ import annotations

import math
import random

import pytest

from flywheel.demo.evaluate import mean_interval, wilson_interval, win_outcome
from flywheel.demo.report import rolling_rate, thumbs_up_by_version, write_report
from flywheel.demo.users import RESPONSES_PER_KIND, UserMix, rating_body


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


@pytest.mark.parametrize("kind", list(RESPONSES_PER_KIND))
def test_rating_bodies_follow_the_gold_rater_and_the_feedback_schema(kind):
    from services.gateway.feedback.schema import FeedbackRequest

    prompt = "What is 2 plus 2?"
    # gold scores: 1 (wrong, concise), 4 (thumb-up answer), 3 (correct, curt); Likert of score 1 is 3
    responses = ["2 plus 2 is 5.", "2 plus 2 is 4. I hope this helps.", "2 plus 2 is 4."][: RESPONSES_PER_KIND[kind]]
    ids = [f"resp-{i}" for i in range(len(responses))]
    body = rating_body(kind, prompt, responses, ids, [f"tok-{i}" for i in ids], "sim-user-0", random.Random(0))
    FeedbackRequest.model_validate(body)  # the gateway's own schema accepts it
    assert body["feedback_tokens"] == [f"tok-{i}" for i in ids] and body["user"] == "sim-user-0"
    expected = {
        "thumb": {"thumb": "down"},
        "likert": {"score": 3},
        "pairwise": {"preferred": "b"},
        "ranking": {"response_ids": ["resp-1", "resp-2", "resp-0"], "ranks": [1, 2, 3]},
    }[kind]
    assert {k: body[k] for k in expected} == expected


def test_a_ranking_of_equally_good_answers_sends_them_as_ties():
    from services.gateway.feedback.schema import FeedbackRequest

    responses = ["2 plus 2 is 4.", "2 plus 2 is 4. I hope this helps.", "2 plus 2 is 4. I hope this helps."]
    body = rating_body(
        "ranking", "What is 2 plus 2?", responses, ["r0", "r1", "r2"], ["t0", "t1", "t2"], "u", random.Random(0)
    )
    FeedbackRequest.model_validate(body)
    assert body["response_ids"] == ["r1", "r2", "r0"] and body["ranks"] == [1, 1, 3]


def test_user_mix_follows_its_weights():
    rng = random.Random(0)
    picks = [UserMix(thumb=1, likert=0, pairwise=3, ranking=0).pick(rng) for _ in range(2000)]
    assert set(picks) == {"thumb", "pairwise"}
    assert 0.70 < picks.count("pairwise") / len(picks) < 0.80
    with pytest.raises(ValueError):
        UserMix(0, 0, 0, 0)
