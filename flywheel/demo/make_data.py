"""Generate the built-in task's shipped data files (seeded: byte-for-byte reproducible).

    python -m flywheel.demo.make_data

writes

    flywheel/demo/data/prompts.jsonl              the training prompts the simulated users ask (and PPO may use)
    flywheel/demo/data/heldout_prompts.jsonl      the held-out prompts of ``rlhf eval``
    flywheel/bootstrap/data/demonstrations.jsonl  SFT data: {"messages": [...], "response": "..."}; only about
                                         45% are answers the gold rater likes (task.DEMONSTRATION_MIX)
    flywheel/bootstrap/data/rankings.jsonl        the first RM's K-way rankings (services/reward/offline.py format),
                                         ranked by the gold rater, as labellers would, plus pairs that
                                         contrast a right sum with a wrong one in the same style

Only training problems appear in the demonstrations and rankings.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from flywheel.demo import gold_rater
from flywheel.demo.task import STYLES, Problem, respond, sample_style, split_problems

SEED = 11
DEMOS_PER_PROBLEM = 4
RANKINGS_PER_PROBLEM = 2
SUM_CONTRASTS_PER_PROBLEM = 3
"""(right sum, wrong sum) pairs per problem, both polite and short, among the rankings: with the
mixed-style rankings alone the first RM learned the style and little of the sums (it picked the right
sum in 59% of held-out pairs), so PPO had nothing to push the digits with. Collecting comparisons where
the model is weakest is what a labelling team would do too."""
DEMO_DATA = Path(__file__).parent / "data"
BOOTSTRAP_DATA = Path(__file__).parent.parent / "bootstrap" / "data"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def prompt_rows(problems: list[Problem]) -> list[dict]:
    return [{"messages": p.messages()} for p in problems]


def demonstration_rows(problems: list[Problem], rng: random.Random) -> list[dict]:
    rows = []
    for p in problems:
        for _ in range(DEMOS_PER_PROBLEM):
            rows.append({"messages": p.messages(), "response": respond(p, sample_style(rng), rng)})
    rng.shuffle(rows)
    return rows


def ranking_rows(problems: list[Problem], rng: random.Random) -> list[dict]:
    """K-way rankings (K = 2..4) of answers in distinct styles, keeping only distinct gold scores
    so that every ranked pair is a real preference; then SUM_CONTRASTS_PER_PROBLEM (right, wrong) pairs."""
    rows = []
    for p in problems:
        for _ in range(RANKINGS_PER_PROBLEM):
            responses, seen_scores = [], set()
            for style in rng.sample(STYLES, rng.randint(2, len(STYLES))):
                r = respond(p, style, rng)
                score = gold_rater.judge(p.prompt, r).score
                if score not in seen_scores:
                    seen_scores.add(score)
                    responses.append(r)
            if len(responses) < 2:
                continue
            rows.append(
                {"prompt": p.messages(), "responses": responses, "ranking": gold_rater.rank(p.prompt, responses)}
            )
    for p in problems:
        for _ in range(SUM_CONTRASTS_PER_PROBLEM):
            responses = [respond(p, "good", rng), respond(p, "wrong", rng)]
            rows.append(
                {"prompt": p.messages(), "responses": responses, "ranking": gold_rater.rank(p.prompt, responses)}
            )
    rng.shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-data", type=Path, default=DEMO_DATA)
    parser.add_argument("--bootstrap-data", type=Path, default=BOOTSTRAP_DATA)
    args = parser.parse_args(argv)
    train, held = split_problems()
    rng = random.Random(SEED)
    files = {
        args.demo_data / "prompts.jsonl": prompt_rows(train),
        args.demo_data / "heldout_prompts.jsonl": prompt_rows(held),
        args.bootstrap_data / "demonstrations.jsonl": demonstration_rows(train, rng),
        args.bootstrap_data / "rankings.jsonl": ranking_rows(train, rng),
    }
    for path, rows in files.items():
        _write_jsonl(path, rows)
        print(f"wrote {len(rows):5d} lines to {path}")


if __name__ == "__main__":
    main()
