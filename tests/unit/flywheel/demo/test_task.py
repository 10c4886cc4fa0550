"""The built-in task: its train/held-out split and the prompts it parses."""

from __future__ import annotations

import pytest

from flywheel.demo.task import QUESTIONS, Problem, all_problems, parse_problem, split_problems


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
