"""The built-in task, its hidden gold rater and the shipped data generated from them."""

from __future__ import annotations

import json
import random

import pytest

from flywheel.demo import gold_rater
from flywheel.demo.make_data import main as make_data
from flywheel.demo.task import (
    DEMONSTRATION_MIX,
    QUESTIONS,
    STYLES,
    Problem,
    all_problems,
    parse_problem,
    respond,
    split_problems,
)


def test_split_is_disjoint_stable_and_covers_every_problem():
    train, held = split_problems()
    assert not set(train) & set(held)
    assert len(train) + len(held) == len(all_problems()) == 10 * 10 * len(QUESTIONS)
    assert len(held) == round(0.2 * len(all_problems()))
    assert split_problems() == (train, held)


@pytest.mark.parametrize("problem", [Problem(3, 4, p) for p in range(len(QUESTIONS))] + [Problem(9, 9, 0)])
def test_every_phrasing_parses_back(problem):
    assert parse_problem(problem.prompt) == problem
    assert parse_problem("  " + problem.prompt + " ") == problem


@pytest.mark.parametrize("text", ["What is 3 minus 4?", "What is 3 plus 4", "Tell me a joke.", ""])
def test_other_prompts_are_not_task_questions(text):
    assert parse_problem(text) is None


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


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    from flywheel.demo.make_data import BOOTSTRAP_DATA, DEMO_DATA

    make_data(["--demo-data", str(tmp_path / "demo"), "--bootstrap-data", str(tmp_path / "bootstrap")])
    for shipped, fresh in (
        (DEMO_DATA / "prompts.jsonl", tmp_path / "demo" / "prompts.jsonl"),
        (DEMO_DATA / "heldout_prompts.jsonl", tmp_path / "demo" / "heldout_prompts.jsonl"),
        (BOOTSTRAP_DATA / "demonstrations.jsonl", tmp_path / "bootstrap" / "demonstrations.jsonl"),
        (BOOTSTRAP_DATA / "rankings.jsonl", tmp_path / "bootstrap" / "rankings.jsonl"),
    ):
        assert shipped.read_bytes() == fresh.read_bytes(), f"{shipped} is stale: run python -m flywheel.demo.make_data"


def test_shipped_data_keeps_heldout_prompts_out_and_leaves_room_to_improve():
    from flywheel.demo.make_data import BOOTSTRAP_DATA, DEMO_DATA

    def prompts(path, key):
        return {json.loads(ln)[key][0]["content"] for ln in path.read_text().splitlines()}

    held = prompts(DEMO_DATA / "heldout_prompts.jsonl", "messages")
    assert held == {p.prompt for p in split_problems()[1]}
    assert not held & prompts(DEMO_DATA / "prompts.jsonl", "messages")
    assert not held & prompts(BOOTSTRAP_DATA / "demonstrations.jsonl", "messages")
    assert not held & prompts(BOOTSTRAP_DATA / "rankings.jsonl", "prompt")
    demos = [json.loads(ln) for ln in (BOOTSTRAP_DATA / "demonstrations.jsonl").read_text().splitlines()]
    good = sum(gold_rater.judge(d["messages"][0]["content"], d["response"]).thumb_up for d in demos) / len(demos)
    assert abs(good - DEMONSTRATION_MIX["good"]) < 0.05, "about half the demonstrations are what the rater likes"
    assert "answer" not in (DEMO_DATA / "prompts.jsonl").read_text(), "prompt files must not leak the gold answer"


def test_rankings_are_strict_gold_orders_in_the_offline_rm_format():
    from flywheel.demo.make_data import BOOTSTRAP_DATA
    from services.reward.offline import read_rankings

    groups = read_rankings(BOOTSTRAP_DATA / "rankings.jsonl")
    assert len(groups) > 300
    for line in (BOOTSTRAP_DATA / "rankings.jsonl").read_text().splitlines()[:200]:
        doc = json.loads(line)
        scores = [gold_rater.judge(doc["prompt"][0]["content"], doc["responses"][i]).score for i in doc["ranking"]]
        assert all(a > b for a, b in zip(scores, scores[1:]))


@pytest.mark.parametrize(
    "scores, ranks", [([4, 3, 3], [1, 2, 2]), ([4, 4, 1], [1, 1, 3]), ([2, 1, 0], [1, 2, 3]), ([3, 3, 3], [1, 1, 1])]
)
def test_tie_ranks_share_a_rank_between_equal_scores(scores, ranks):
    assert gold_rater.tie_ranks(scores) == ranks
