"""Generate ``example_rankings.jsonl``: a tiny K-way rankings file for the RM's offline start.

Each line asks "What is A plus B?" (in the phrasings of the default model's corpus) and ranks
2 or 3 responses, best first:

    1. the correct sum          "12 plus 98 is 110."
    2. a wrong sum              "12 plus 98 is 113."        (3-way lines only)
    3. an evasive non-answer    "I am not sure, sorry."

Responses are listed in shuffled order; ``ranking`` gives their indices best first. Telling an
answer from a non-answer is learnable by a tiny model from a few dozen lines; telling a correct sum
from a wrong one needs arithmetic, which it is not expected to learn from this little data.
Seeded, so the output is byte-for-byte reproducible; the committed file is its output:

    python services/reward/data/make_example_rankings.py    # writes example_rankings.jsonl beside it
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 7
LINES = 60
OUT = Path(__file__).with_name("example_rankings.jsonl")

QUESTIONS = ["What is {a} plus {b}?", "How much is {a} plus {b}?", "Can you tell me {a} plus {b}?"]
ANSWERS = ["{a} plus {b} is {s}.", "{a} plus {b} equals {s}.", "Sure, here is the answer. {a} plus {b} is {s}."]
EVASIVE = [
    "I am not sure, sorry.",
    "I do not know the answer to that.",
    "Could you ask me something else?",
    "Numbers are hard, I cannot say.",
    "Let me think about that. I do not know.",
]
SYSTEM = "You are a helpful assistant."


def make_line(rng: random.Random) -> dict:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    s = a + b
    wrong = s + rng.choice([d for d in range(-9, 10) if d and s + d > 0])
    prompt: list[dict] = [{"role": "user", "content": rng.choice(QUESTIONS).format(a=a, b=b)}]
    if rng.random() < 0.3:
        prompt.insert(0, {"role": "system", "content": SYSTEM})
    best_first = [rng.choice(ANSWERS).format(a=a, b=b, s=s)]
    if rng.random() < 0.8:
        best_first.append(rng.choice(ANSWERS).format(a=a, b=b, s=wrong))
    best_first.append(rng.choice(EVASIVE))
    shown = list(range(len(best_first)))
    rng.shuffle(shown)  # shown[i] = rank of the i-th listed response
    responses = [best_first[r] for r in shown]
    ranking = sorted(range(len(shown)), key=lambda i: shown[i])
    return {"prompt": prompt, "responses": responses, "ranking": ranking}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--lines", type=int, default=LINES)
    args = parser.parse_args()
    rng = random.Random(SEED)
    text = "".join(json.dumps(make_line(rng), ensure_ascii=False) + "\n" for _ in range(args.lines))
    args.out.write_text(text)
    print(f"wrote {args.lines} rankings to {args.out}")


if __name__ == "__main__":
    main()
