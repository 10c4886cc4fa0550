"""`rlhf eval`: compare two policy versions on held-out prompts with the hidden gold rater.

InstructGPT's headline number is how often labellers prefer the new model's output to the
baseline's. Here the labeller is the gold rater (gold_rater.py) and the prompts are the task's
held-out ones (never asked by the demo's users nor in the offline data):

    for each held-out prompt, sample ``samples`` responses from A and from B (temperature 1)
    outcome = 1 if gold score(B) > gold score(A), 0.5 on a tie, 0 otherwise   (per pair of samples)
    win rate of B over A = mean outcome, with a 95% normal-approximation interval

It also reports each version's gold thumbs-up rate (Wilson interval) and the alignment tax:
perplexity on the held-out lines of the pretraining corpus (flywheel/bootstrap/pretrain.py's split), so
PPO and PPO-ptx runs can be compared on it.

    rlhf eval                         # policy-0001 vs the current policy
    rlhf eval --a policy-0001 --b policy-0004 --samples 4 --out var/eval
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flywheel.demo import gold_rater
from flywheel.demo.task import Problem, split_problems
from shared.logging import get_logger, log_event
from shared.model_store import ModelStore
from shared.models.default_model import DEFAULT_CORPUS

log = get_logger(__name__)
Z95 = 1.959964


# --- statistics (pure) ----------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (nan, nan) without trials."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_outcome(score_a: float, score_b: float) -> float:
    """1 when B beats A, 0.5 on a tie, 0 when A wins."""
    return 1.0 if score_b > score_a else 0.5 if score_b == score_a else 0.0


def win_rate_ceiling(scores_a: list[int], max_score: int = gold_rater.MAX_SCORE) -> float:
    """The highest win rate any B can reach against A's answers (ties count half):

        ceiling = mean over pairs of (1 if score(A) < max_score else 1/2) = 1 - P(A scores max) / 2

    A perfect B wins every pair where A fell short and ties the rest: against an A whose answers are
    perfect 40% of the time no policy can reach 80%. nan without pairs."""
    if not scores_a:
        return math.nan
    return sum(1.0 if s < max_score else 0.5 for s in scores_a) / len(scores_a)


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): normal-approximation interval of a mean, clipped to [0, 1]."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


# --- sampling --------------------------------------------------------------------------------------


@torch.no_grad()
def sample_responses(
    tokenizer: Any,
    model: Any,  # a transformers causal LM: generate() is typed for transformers' own checker, not mypy
    prompts: list[str],
    samples: int,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[str]]:
    """``samples`` responses to each user prompt from a causal LM and its tokenizer (transformers)."""
    from shared.events import Message
    from shared.models.encoding import render_prompt

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    jobs = [(i, render_prompt(tokenizer, [Message("user", p)])) for i, p in enumerate(prompts) for _ in range(samples)]
    out: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        longest = max(len(ids) for _, ids in chunk)
        ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (_, p) in enumerate(chunk):  # left padding: generation continues every row at the end
            ids[row, longest - len(p) :] = torch.tensor(p)
            mask[row, longest - len(p) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        for row, (i, _) in enumerate(chunk):
            out[i].append(tokenizer.decode(gen[row, longest:], skip_special_tokens=True).strip())
    return out


# --- the comparison --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionReport:
    version: str
    thumbs_up_rate: float
    thumbs_up_low: float
    thumbs_up_high: float
    mean_gold_score: float
    correct_rate: float
    polite_rate: float
    concise_rate: float
    heldout_perplexity: float
    responses: int


@dataclass(frozen=True)
class Comparison:
    a: VersionReport
    b: VersionReport
    win_rate: float
    win_low: float
    win_high: float
    wins: int
    ties: int
    losses: int
    prompts: int
    samples_per_prompt: int
    examples: list[dict]
    win_ceiling: float = math.nan
    """The win rate a perfect B would reach against these answers of A (win_rate_ceiling)."""

    def table(self) -> str:
        rows = [("", self.a.version, self.b.version)]
        for label, key, fmt in (
            ("gold thumbs-up rate", "thumbs_up_rate", "{:.1%}"),
            ("  95% interval", None, ""),
            ("mean gold score (0-4)", "mean_gold_score", "{:.2f}"),
            ("correct", "correct_rate", "{:.1%}"),
            ("polite", "polite_rate", "{:.1%}"),
            ("concise", "concise_rate", "{:.1%}"),
            ("held-out corpus perplexity", "heldout_perplexity", "{:.2f}"),
            ("responses judged", "responses", "{}"),
        ):
            if key is None:
                a, b = (f"[{v.thumbs_up_low:.1%}, {v.thumbs_up_high:.1%}]" for v in (self.a, self.b))
            else:
                a, b = (fmt.format(getattr(v, key)) for v in (self.a, self.b))
            rows.append((label, a, b))
        width = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
        lines.append(
            f"win rate of {self.b.version} over {self.a.version}: {self.win_rate:.1%} "
            f"[{self.win_low:.1%}, {self.win_high:.1%}] ({self.wins} wins, {self.ties} ties, "
            f"{self.losses} losses; {self.prompts} held-out prompts x {self.samples_per_prompt} samples; "
            f"a perfect policy would reach {self.win_ceiling:.1%})"
        )
        return "\n".join(lines)


def version_report(
    version: str, problems: list[Problem], responses: list[list[str]], perplexity: float
) -> VersionReport:
    verdicts = [gold_rater.judge(p.prompt, r) for p, rs in zip(problems, responses) for r in rs]
    n = len(verdicts)
    up = sum(v.thumb_up for v in verdicts)
    low, high = wilson_interval(up, n)
    return VersionReport(
        version,
        up / n,
        low,
        high,
        sum(v.score for v in verdicts) / n,
        sum(v.correct for v in verdicts) / n,
        sum(v.polite for v in verdicts) / n,
        sum(v.concise for v in verdicts) / n,
        perplexity,
        n,
    )


def compare(
    store: ModelStore,
    version_a: str,
    version_b: str,
    *,
    samples: int = 2,
    max_prompts: int | None = None,
    corpus: Path = DEFAULT_CORPUS,
    seed: int = 0,
    perplexity_lines: int | None = None,
) -> Comparison:
    from flywheel.bootstrap.pretrain import heldout_perplexity
    from shared.models.loading import load_verified_policy

    _, held = split_problems()
    problems = held[:max_prompts] if max_prompts else held
    prompts = [p.prompt for p in problems]
    reports, sampled = [], []
    for version in (version_a, version_b):
        started = time.monotonic()
        tokenizer, model = load_verified_policy(store, version)
        responses = sample_responses(tokenizer, model, prompts, samples, seed=seed)
        ppl = heldout_perplexity(tokenizer, model, corpus, max_lines=perplexity_lines)
        reports.append(version_report(version, problems, responses, ppl))
        sampled.append(responses)
        log_event(
            log,
            "evaluated policy version",
            version=version,
            responses=len(prompts) * samples,
            thumbs_up_rate=round(reports[-1].thumbs_up_rate, 3),
            perplexity=round(ppl, 2),
            seconds=round(time.monotonic() - started, 1),
        )
    outcomes, scores_a = [], []
    for p, ra, rb in zip(problems, *sampled):
        for a, b in zip(ra, rb):
            scores_a.append(gold_rater.judge(p.prompt, a).score)
            outcomes.append(win_outcome(scores_a[-1], gold_rater.judge(p.prompt, b).score))
    rate, low, high = mean_interval(outcomes)
    examples = [{"prompt": p.prompt, "a": ra[0], "b": rb[0]} for p, ra, rb in list(zip(problems, *sampled))[:8]]
    return Comparison(
        reports[0],
        reports[1],
        rate,
        low,
        high,
        outcomes.count(1.0),
        outcomes.count(0.5),
        outcomes.count(0.0),
        len(problems),
        samples,
        examples,
        win_rate_ceiling(scores_a),
    )


def resolve_version(store: ModelStore, name: str) -> str:
    """ "current", "first", "latest" or a version name -> a policy version in the store."""
    versions = store.versions("policy")
    if not versions:
        raise ValueError(f"no policy version in the model store at {store.root}; run `rlhf bootstrap`")
    if name == "current":
        return store.current("policy") or versions[-1]
    if name == "first":
        return versions[0]
    if name == "latest":
        return versions[-1]
    if name not in versions:
        raise ValueError(f"{name} is not in the model store (policy versions: {', '.join(versions)})")
    return name


def main(argv: list[str] | None = None) -> int:
    from shared.config import ModelStoreConfig, load_config
    from shared.logging import setup_logging

    parser = argparse.ArgumentParser(prog="rlhf eval", description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="first", help="baseline policy version (default: the first, the SFT model)")
    parser.add_argument("--b", default="current", help="policy version compared to it (default: the current one)")
    parser.add_argument("--samples", type=int, default=4, help="responses per held-out prompt and version")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N held-out prompts")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="pretraining corpus (perplexity)")
    parser.add_argument("--store", type=Path, default=None, help="model store root (default RLHF_MODEL_STORE_ROOT)")
    parser.add_argument("--out", type=Path, default=None, help="also write eval.json to this directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging("eval")
    store = ModelStore(args.store or load_config(ModelStoreConfig).root)
    a, b = resolve_version(store, args.a), resolve_version(store, args.b)
    result = compare(
        store, a, b, samples=args.samples, max_prompts=args.max_prompts, corpus=args.corpus, seed=args.seed
    )
    print(result.table())
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eval.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        print(f"wrote {args.out / 'eval.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
