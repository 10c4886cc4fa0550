"""The hidden gold rater: the rule the simulated users rate by. No learning code ever sees it.

The services learn only from the ratings users send (thumbs, Likert, pairwise, rankings); this
module is what those users *believe*. A response to "What is A plus B?" is judged on three things
a tiny model can control:

    correct   the last number in the response is A + B
    polite    it contains the courtesy phrase "I hope this helps"
    concise   it has at most MAX_CONCISE_WORDS words

    score     = 2 * correct + 1 * polite + 1 * concise        (0..4)
    thumb up  = correct and polite and concise
    Likert    = 1 + score * 6 / 4, rounded                    (1..7)

Pairwise choices and rankings order responses by score (ties: "tie", or equal ranks).
Anything that is not one of the task's questions, or an empty answer, scores 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flywheel.demo.task import parse_problem

MAX_CONCISE_WORDS = 14
COURTESY_RE = re.compile(r"\bi hope this helps\b", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d+")
MAX_SCORE = 4


@dataclass(frozen=True)
class Verdict:
    correct: bool
    polite: bool
    concise: bool

    @property
    def score(self) -> int:
        return 2 * self.correct + self.polite + self.concise

    @property
    def thumb_up(self) -> bool:
        return self.correct and self.polite and self.concise

    @property
    def likert(self) -> int:
        return 1 + round(self.score * 6 / MAX_SCORE)


def judge(prompt: str, response: str) -> Verdict:
    """The gold verdict on ``response`` to the user prompt ``prompt``."""
    problem = parse_problem(prompt)
    if problem is None or not response.strip():
        return Verdict(False, False, False)
    numbers = _NUMBER_RE.findall(response)
    correct = bool(numbers) and int(numbers[-1]) == problem.answer
    polite = bool(COURTESY_RE.search(response))
    concise = len(response.split()) <= MAX_CONCISE_WORDS
    return Verdict(correct, polite, concise)


def prefer(prompt: str, response_a: str, response_b: str) -> str:
    """Pairwise choice: "a", "b" or "tie" by gold score."""
    sa, sb = judge(prompt, response_a).score, judge(prompt, response_b).score
    return "a" if sa > sb else "b" if sb > sa else "tie"


def tie_ranks(scores_best_first: list[int]) -> list[int]:
    """Ranks for scores listed best first, equal scores sharing a rank: [4, 3, 3] -> [1, 2, 2]."""
    ranks: list[int] = []
    for i, s in enumerate(scores_best_first):
        ranks.append(ranks[-1] if i and s == scores_best_first[i - 1] else i + 1)
    return ranks


def rank(prompt: str, responses: list[str]) -> list[int]:
    """Indices of ``responses`` best first by gold score (a stable sort: ties keep their order)."""
    scores = [judge(prompt, r).score for r in responses]
    return sorted(range(len(responses)), key=lambda i: -scores[i])
