"""The ratings simulated users send (flywheel/demo/users.py)."""

from __future__ import annotations

import random

import pytest

from flywheel.demo.users import RESPONSES_PER_KIND, UserMix, rating_body


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


def test_each_simulated_user_gets_a_key_of_its_own_in_the_gateways_format():
    from flywheel.demo.users import make_user_keys, parse_user_keys

    keys = make_user_keys(3)
    assert [name for name, _ in keys] == ["sim-user-0", "sim-user-1", "sim-user-2"]
    assert len({key for _, key in keys}) == 3
    assert parse_user_keys(",".join(f"{n}:{k}" for n, k in keys)) == keys
    with pytest.raises(ValueError, match="no name"):
        parse_user_keys("x" * 40)
