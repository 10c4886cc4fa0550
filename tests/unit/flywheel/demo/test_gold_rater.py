"""The hidden gold rater (flywheel/demo/gold_rater.py): verdicts, scores, preferences, rankings and ties."""

from __future__ import annotations

import random

import pytest

from flywheel.demo import gold_rater
from flywheel.demo.task import STYLES, Problem, all_problems, respond


@pytest.mark.parametrize(
    ("response", "correct", "polite", "concise"),
    [
        ("3 plus 4 is 7. I hope this helps.", True, True, True),
        ("3 plus 4 is 7.", True, False, True),
        ("3 plus 4 is 8. I hope this helps.", False, True, True),
        ("7", True, False, True),
        ("i hope this helps, 3 plus 4 equals 7", True, True, True),
        (
            "Let me think. " + "We add numbers all day long at school and at home. " + "3 plus 4 is 7.",
            True,
            False,
            False,
        ),
        ("I hope this helps.", False, True, True),
        ("3 plus 4 is 17. I hope this helps.", False, True, True),
    ],
)
def test_gold_verdict(response, correct, polite, concise):
    v = gold_rater.judge("What is 3 plus 4?", response)
    assert (v.correct, v.polite, v.concise) == (correct, polite, concise)
    assert v.thumb_up == (correct and polite and concise)
    assert 1 <= v.likert <= 7


def test_scores_order_the_styles_and_map_to_likert_extremes():
    rng = random.Random(0)
    p = Problem(2, 5, 1)
    scores = {s: gold_rater.judge(p.prompt, respond(p, s, rng)).score for s in STYLES}
    assert scores["good"] == gold_rater.MAX_SCORE and scores["good"] > scores["curt"] > scores["wrong"]
    assert gold_rater.judge(p.prompt, respond(p, "good", rng)).likert == 7
    assert gold_rater.judge("not a task question", "2 plus 5 is 7. I hope this helps.").likert == 1


def test_prefer_and_rank_follow_the_score():
    prompt = "What is 1 plus 1?"
    good, curt, wrong = "1 plus 1 is 2. I hope this helps.", "1 plus 1 is 2.", "1 plus 1 is 3."
    assert gold_rater.prefer(prompt, good, curt) == "a"
    assert gold_rater.prefer(prompt, wrong, curt) == "b"
    assert gold_rater.prefer(prompt, curt, curt) == "tie"
    assert gold_rater.rank(prompt, [wrong, good, curt]) == [1, 2, 0]


def test_wrong_answers_are_never_the_sum():
    rng = random.Random(1)
    for p in all_problems()[:100]:
        assert not gold_rater.judge(p.prompt, respond(p, "wrong", rng)).correct


@pytest.mark.parametrize(
    "scores, ranks", [([4, 3, 3], [1, 2, 2]), ([4, 4, 1], [1, 1, 3]), ([2, 1, 0], [1, 2, 3]), ([3, 3, 3], [1, 1, 1])]
)
def test_tie_ranks_share_a_rank_between_equal_scores(scores, ranks):
    assert gold_rater.tie_ranks(scores) == ranks
