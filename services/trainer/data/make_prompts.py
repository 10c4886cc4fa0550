"""Generate ``prompts.jsonl``: the trainer's default prompt file (mixed with live user prompts).

One JSON object per line, ``{"messages": [{"role": ..., "content": ...}, ...]}``, the conversation
up to the assistant's turn. The questions are the phrasings the default model's corpus and the
example rankings use (sums of two numbers), plus a few greetings, so the reward model trained from
``services/reward/data/example_rankings.jsonl`` has something to say about the answers. The first
``RLHF_TRAINER_HELDOUT_PROMPTS`` lines are the held-out set of the publish gate. Seeded, so the output
is reproducible; the committed file is its output:

    python services/trainer/data/make_prompts.py    # writes prompts.jsonl beside it
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 11
LINES = 200
OUT = Path(__file__).with_name("prompts.jsonl")

QUESTIONS = ["What is {a} plus {b}?", "How much is {a} plus {b}?", "Can you tell me {a} plus {b}?"]
OTHER = ["Hello!", "Hi, who are you?", "Can you help me with a sum?", "Thank you!"]
SYSTEM = "You are a helpful assistant."


def make_line(rng: random.Random) -> dict:
    if rng.random() < 0.1:
        content = rng.choice(OTHER)
    else:
        content = rng.choice(QUESTIONS).format(a=rng.randint(1, 99), b=rng.randint(1, 99))
    messages = [{"role": "user", "content": content}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--lines", type=int, default=LINES)
    args = parser.parse_args()
    rng = random.Random(SEED)
    seen: set[str] = set()
    lines: list[str] = []
    while len(lines) < args.lines:
        line = json.dumps(make_line(rng))
        if line not in seen:  # distinct prompts only
            seen.add(line)
            lines.append(line)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} prompts to {args.out}")


if __name__ == "__main__":
    main()
