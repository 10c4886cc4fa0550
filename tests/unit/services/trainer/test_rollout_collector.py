"""Rollout collection: staleness in learner steps, which samples are dropped and why, and the
Rollouts handed to the learner (version, behaviour logprobs, score, RM version)."""

from __future__ import annotations

import pytest

from services.trainer.rollout_collector import RolloutCollector, SampledCompletion, drop_reason
from shared.events import Message

AGES = {"policy-0001": 30, "policy-0003": 12, "policy-0004": 2}
"""Learner steps since the weights were each version (loop.rollout_ages along the lineage)."""


def sample(
    version: str = "policy-0004",
    *,
    text: str = "4 plus 4 is 8.",
    tokens=(11, 12, 6),
    logprobs=(-0.1, -0.2, -0.3),
    versions=None,
    prompt_text: str = "What is 4 plus 4?",
) -> SampledCompletion:
    return SampledCompletion(
        prompt=(Message("user", prompt_text),),
        prompt_token_ids=[0, 4, 9],
        token_ids=list(tokens),
        logprobs=list(logprobs),
        text=text,
        finish_reason="stop",
        policy_version=version,
        policy_versions=list(versions or [version]),
        response_id=f"resp-{prompt_text}",
    )


@pytest.mark.parametrize(
    "s, max_staleness_steps, reason",
    [
        (sample(), 2, None),
        (sample(), 1, "stale"),
        (sample("policy-0003"), 12, None),
        (sample("policy-0003"), 11, "stale"),
        (sample("policy-0001"), 16, "stale"),
        (sample("policy-0002"), 500, "unknown_version"),
        (sample(versions=["policy-0003", "policy-0004"]), 500, "straddled"),
        (sample(logprobs=()), 16, "no_logprobs"),
        (sample(tokens=()), 16, "empty"),
        (sample(text="  "), 16, "empty"),
    ],
)
def test_drop_reason(s, max_staleness_steps, reason):
    assert drop_reason(s, AGES, max_staleness_steps) == reason


def test_a_rollout_100_steps_old_under_an_unchanged_served_version_is_stale():
    """One version served all along (every candidate refused): its rollouts age with the learner."""
    assert drop_reason(sample("policy-0001"), {"policy-0001": 100}, 64) == "stale"
    assert drop_reason(sample("policy-0001"), {"policy-0001": 3}, 64) is None


class ListSampler:
    """Returns prepared samples for the prompts in order (what the inference service does over gRPC)."""

    def __init__(self, samples):
        self.samples = samples
        self.calls = []

    def sample(self, prompts, *, max_tokens, top_p, seed=None, interrupt=None, poll_s=0.25):
        self.calls.append((len(prompts), max_tokens, top_p, seed))
        return self.samples[: len(prompts)]


class LengthScorer:
    """Scores by response length (a stand-in RM)."""

    def __init__(self):
        self.calls = 0

    def score(self, pairs):
        self.calls += 1
        return [float(len(r)) for _, r in pairs], "rm-0002"


def test_collect_keeps_fresh_samples_with_their_version_and_logprobs():
    samples = [
        sample(prompt_text="a"),
        sample("policy-0003", text="xy", prompt_text="b"),
        sample("policy-0001", prompt_text="c"),
        sample(text="", prompt_text="d"),
    ]
    sampler, scorer = ListSampler(samples), LengthScorer()
    collector = RolloutCollector(sampler, scorer, max_tokens=32, top_p=0.9)
    result = collector.collect([s.prompt for s in samples], AGES, max_staleness_steps=16, seed=5)
    assert sampler.calls == [(4, 32, 0.9, 5)]
    assert result.sampled == 4 and dict(result.dropped) == {"stale": 1, "empty": 1}
    assert [r.policy_version for r in result.rollouts] == ["policy-0004", "policy-0003"]
    first, second = result.rollouts
    assert first.behaviour_logprobs == [-0.1, -0.2, -0.3] and first.response_token_ids == [11, 12, 6]
    assert first.prompt_token_ids == [0, 4, 9] and first.messages == [Message("user", "a")]
    assert (first.score, second.score) == (float(len("4 plus 4 is 8.")), 2.0)
    assert {first.rm_version, second.rm_version} == {"rm-0002"} and first.extra["response_id"] == "resp-a"


def test_collect_does_not_call_the_scorer_when_everything_is_dropped():
    scorer = LengthScorer()
    result = RolloutCollector(ListSampler([sample("policy-0002")]), scorer, max_tokens=8).collect(
        [(Message("user", "q"),)], AGES, max_staleness_steps=64
    )
    assert result.rollouts == [] and dict(result.dropped) == {"unknown_version": 1} and scorer.calls == 0


def test_a_batch_sampled_in_groups_keeps_each_prompts_seed_and_is_scored_once():
    samples = [sample(prompt_text=str(i)) for i in range(5)]
    sampler, scorer = ListSampler(samples), LengthScorer()
    collector = RolloutCollector(sampler, scorer, max_tokens=8)
    prompts = [s.prompt for s in samples]
    got = collector.sample(prompts[:2], seed=100) + collector.sample(prompts[2:], seed=102)
    result = collector.finish(got, AGES, max_staleness_steps=16)
    assert [(n, seed) for n, _, _, seed in sampler.calls] == [(2, 100), (3, 102)]
    assert len(result.rollouts) == 5 and result.sampled == 5 and scorer.calls == 1
