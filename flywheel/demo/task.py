"""The built-in task: single-digit additions asked in plain English.

    "What is 3 plus 4?"   ->   "3 plus 4 is 7. I hope this helps."

Everything here is public knowledge the learning code may see (the prompts and the kinds of answer
people give); how answers are *judged* lives in gold_rater.py, which only the simulator uses.

A problem is (a, b, phrasing) with a, b in 0..9 and one of the QUESTIONS phrasings (those of the
default model's corpus, shared/data/make_corpus.py): 10 * 10 * 4 = 400 prompts. A seeded 20% of
them are held out: the demo's users and the offline data use only the rest, ``rlhf eval`` only the
held-out ones.

Answer styles (``respond``): the demonstrations and the rankings' candidates are drawn from these,
so SFT learns a mixture of good and flawed answers and leaves room for RLHF to improve on it:

    good      "3 plus 4 is 7. I hope this helps."
    curt      "3 plus 4 is 7."                                   (no courtesy)
    wrong     "3 plus 4 is 8. I hope this helps."                (sum off by one or two)
    rambling  "Let me think about that. ... 3 plus 4 is 7. ..."  (far too long)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

QUESTIONS = (
    "What is {a} plus {b}?",
    "How much is {a} plus {b}?",
    "Can you tell me {a} plus {b}?",
    "What do you get when you add {a} and {b}?",
)
DIGITS = range(10)
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 6

STYLES = ("good", "curt", "wrong", "rambling")
DEMONSTRATION_MIX = {"good": 0.45, "curt": 0.25, "wrong": 0.15, "rambling": 0.15}
"""Share of each answer style among the demonstrations: only 45% are what the gold rater wants."""
COURTESY = "I hope this helps."
RAMBLE_OPENERS = ("Let me think about that.", "That is a great question.", "Good question.")
RAMBLE_FILLERS = (
    "Numbers are fun to add, and adding is one of the first things we learn at school.",
    "People add numbers every day, for example when they count money or apples.",
    "Adding two numbers means putting them together and counting them all.",
)

_QUESTION_RES = tuple(
    re.compile("^" + re.escape(q).replace(r"\{a\}", r"(\d+)").replace(r"\{b\}", r"(\d+)") + "$") for q in QUESTIONS
)


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    phrasing: int
    """Index into QUESTIONS."""

    @property
    def prompt(self) -> str:
        return QUESTIONS[self.phrasing].format(a=self.a, b=self.b)

    @property
    def answer(self) -> int:
        return self.a + self.b

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def all_problems() -> list[Problem]:
    return [Problem(a, b, p) for a in DIGITS for b in DIGITS for p in range(len(QUESTIONS))]


def split_problems(
    seed: int = SPLIT_SEED, heldout_fraction: float = HELDOUT_FRACTION
) -> tuple[list[Problem], list[Problem]]:
    """(train, held out): a seeded shuffle of every problem; the same split everywhere."""
    problems = all_problems()
    random.Random(seed).shuffle(problems)
    n_held = round(heldout_fraction * len(problems))
    return sorted(problems[n_held:], key=_order), sorted(problems[:n_held], key=_order)


def _order(p: Problem) -> tuple[int, int, int]:
    return (p.a, p.b, p.phrasing)


def parse_problem(text: str) -> Problem | None:
    """The problem a prompt asks, or None when it is not one of the task's questions."""
    text = text.strip()
    for phrasing, pattern in enumerate(_QUESTION_RES):
        m = pattern.match(text)
        if m:
            return Problem(int(m.group(1)), int(m.group(2)), phrasing)
    return None


def respond(problem: Problem, style: str, rng: random.Random) -> str:
    """An answer to ``problem`` in one of STYLES (randomised within the style)."""
    a, b, s = problem.a, problem.b, problem.answer
    statement = f"{a} plus {b} is {{s}}." if rng.random() < 0.7 else f"{a} plus {b} equals {{s}}."
    if style == "good":
        return f"{statement.format(s=s)} {COURTESY}"
    if style == "curt":
        return statement.format(s=s)
    if style == "wrong":
        wrong = s + rng.choice([d for d in (-2, -1, 1, 2) if s + d >= 0])
        return f"{statement.format(s=wrong)} {COURTESY}"
    if style == "rambling":
        fillers = rng.sample(RAMBLE_FILLERS, 2)
        return f"{rng.choice(RAMBLE_OPENERS)} {fillers[0]} {statement.format(s=s)} {fillers[1]}"
    raise ValueError(f"unknown answer style {style!r}; expected one of {STYLES}")


def sample_style(rng: random.Random, mix: dict[str, float] = DEMONSTRATION_MIX) -> str:
    styles = list(mix)
    return rng.choices(styles, weights=[mix[s] for s in styles])[0]
