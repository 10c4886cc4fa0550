"""Rollouts: prompts -> responses sampled by the served policy (inference service) -> RM scores
(reward service) -> ``Rollout``s the learner trains on; stale or unusable samples dropped.

    collector = RolloutCollector(GrpcPolicySampler(channel), GrpcRewardScorer(channel), max_tokens=48)
    result = collector.collect(prompts, ages={"policy-0001": 12, "policy-0002": 2}, max_staleness_steps=64)
    result.rollouts, result.dropped          # {"stale": 2, "empty": 1, ...}

Each sample carries the policy version that produced it (from the inference response) and the
log-probability of every token under that version, so when a rollout comes from an older version
than the learner's weights, PPO's ratio is taken against those recorded behaviour logprobs.

Staleness is counted in what changed: a rollout is as stale as the learner steps applied since the
learner's weights were the version that sampled it (``ages``, kept by the loop along the trainer's
lineage: the version it started from, then each version it published; a rollback restarts it). A
served version that stays the same while the learner trains on does not keep its rollouts fresh:
100 steps later they are 100 steps stale, however few versions were published. A rollout from a
version not in the lineage (someone else's, or one rolled back away from) is never used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from services.trainer import metrics
from services.trainer.prompts import Prompt
from services.trainer.rollout_batch import Rollout
from shared.events import Message
from shared.logging import get_logger
from shared.pb import common_pb2, inference_pb2, inference_pb2_grpc, reward_pb2, reward_pb2_grpc

log = get_logger(__name__)


@dataclass(frozen=True)
class SampledCompletion:
    """One completion from the inference service."""

    prompt: Prompt
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    policy_version: str
    policy_versions: list[str]
    response_id: str


class PolicySampler(Protocol):
    def sample(
        self,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int,
        top_p: float,
        seed: int | None = None,
        interrupt: Callable[[], bool] | None = None,
        poll_s: float = 0.25,
    ) -> list[SampledCompletion]:
        """One completion per prompt, in order, with token ids and behaviour logprobs; with
        ``interrupt`` (asked every ``poll_s`` while waiting) possibly only those of a prefix of
        ``prompts``, the rest cancelled."""


class Scorer(Protocol):
    def score(self, pairs: Sequence[tuple[Prompt, str]]) -> tuple[list[float], str]:
        """(RM score per (conversation, response), the RM version that scored them all)."""


# --- pure rules -------------------------------------------------------------------------------


def drop_reason(sample: SampledCompletion, ages: Mapping[str, int], max_staleness_steps: int) -> str | None:
    """Why ``sample`` must not be trained on, or None when it may be. ``ages``: version -> learner
    steps since the learner's weights were that version (``loop.rollout_ages``)."""
    if len(sample.policy_versions) > 1:
        return "straddled"  # generated across a hot-swap: no single behaviour policy
    age = ages.get(sample.policy_version)
    if age is None:
        return "unknown_version"
    if age > max_staleness_steps:
        return "stale"
    if not sample.token_ids:
        return "empty"
    if len(sample.logprobs) != len(sample.token_ids):
        return "no_logprobs"
    if not sample.text.strip():
        return "empty"  # the reward service cannot score an empty answer (e.g. EOS only)
    return None


# --- collection -------------------------------------------------------------------------------


@dataclass
class CollectResult:
    rollouts: list[Rollout]
    dropped: Counter
    """Samples not used, by reason (stale, unknown_version, straddled, empty, no_logprobs)."""
    rm_version: str
    sampled: int


class RolloutCollector:
    def __init__(self, sampler: PolicySampler, scorer: Scorer, *, max_tokens: int, top_p: float = 1.0):
        self.sampler = sampler
        self.scorer = scorer
        self.max_tokens = max_tokens
        self.top_p = top_p

    def collect(
        self, prompts: Sequence[Prompt], ages: Mapping[str, int], max_staleness_steps: int, seed: int | None = None
    ) -> CollectResult:
        return self.finish(self.sample(prompts, seed), ages, max_staleness_steps)

    def sample(
        self,
        prompts: Sequence[Prompt],
        seed: int | None = None,
        interrupt: Callable[[], bool] | None = None,
        poll_s: float = 0.25,
    ) -> list[SampledCompletion]:
        """One completion per prompt (prompt i sampled with seed + i: a batch sampled in groups, each
        given the seed plus its offset, is sampled as in one call). With ``interrupt``, asked every
        ``poll_s`` while the group is out: once it says so, the rest is cancelled and the completions
        of the first prompts, in order, come back (a prefix: sample the others again later)."""
        return self.sampler.sample(
            prompts, max_tokens=self.max_tokens, top_p=self.top_p, seed=seed, interrupt=interrupt, poll_s=poll_s
        )

    def finish(
        self, samples: Sequence[SampledCompletion], ages: Mapping[str, int], max_staleness_steps: int
    ) -> CollectResult:
        """Drop what must not be trained on, score the rest in one go (one RM version for the batch)."""
        dropped: Counter = Counter()
        kept: list[SampledCompletion] = []
        for s in samples:
            reason = drop_reason(s, ages, max_staleness_steps)
            if reason:
                dropped[reason] += 1
            else:
                kept.append(s)
        if not kept:
            return CollectResult([], dropped, "", len(samples))
        scores, rm_version = self.scorer.score([(s.prompt, s.text) for s in kept])
        rollouts = [
            Rollout(
                messages=list(s.prompt),
                prompt_token_ids=s.prompt_token_ids,
                response_token_ids=s.token_ids,
                behaviour_logprobs=s.logprobs,
                policy_version=s.policy_version,
                finish_reason=s.finish_reason,
                score=float(score),
                rm_version=rm_version,
                extra={"response_id": s.response_id},
            )
            for s, score in zip(kept, scores, strict=True)
        ]
        return CollectResult(rollouts, dropped, rm_version, len(samples))


# --- gRPC clients of the inference and reward services ----------------------------------------


def chat_messages(prompt: Sequence[Message]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=m.role, content=m.content) for m in prompt]


class GrpcPolicySampler:
    """Samples from the inference service; all prompts of a batch in flight at once, so vLLM batches them."""

    def __init__(self, channel: grpc.Channel, timeout_s: float):
        self.stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self.timeout_s = timeout_s

    def sample(
        self,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int,
        top_p: float,
        seed: int | None = None,
        interrupt: Callable[[], bool] | None = None,
        poll_s: float = 0.25,
    ) -> list[SampledCompletion]:
        """All prompts in flight at once; completions in order. ``interrupt`` (asked every ``poll_s``
        while waiting): cancel what is still running (the inference service aborts it in vLLM, freeing
        the capacity for users at once) and return the completed prefix."""
        futures: list[Future] = []
        for i, prompt in enumerate(prompts):
            # Temperature 1: the returned logprobs are the untempered policy's (TrainerConfig checks PPO's).
            sampling = inference_pb2.SamplingParams(
                temperature=1.0, top_p=top_p, max_tokens=max_tokens, n=1, logprobs=True
            )
            if seed is not None:
                sampling.seed = seed + i
            req = inference_pb2.GenerateRequest(messages=chat_messages(prompt), sampling=sampling, source="trainer")
            futures.append(self.stub.Generate.future(req, timeout=self.timeout_s))
        out: list[SampledCompletion] = []
        for i, (prompt, fut) in enumerate(zip(prompts, futures)):
            if interrupt is not None and not _wait_unless(fut, interrupt, poll_s):
                for rest in futures[i:]:
                    rest.cancel()
                metrics.ROLLOUTS_CANCELLED.inc(sum(1 for rest in futures[i:] if rest.cancelled()))
                return out
            resp = fut.result()
            c = resp.completions[0]
            out.append(
                SampledCompletion(
                    prompt=prompt,
                    prompt_token_ids=list(resp.prompt_token_ids),
                    token_ids=list(c.token_ids),
                    logprobs=list(c.logprobs),
                    text=c.text,
                    finish_reason=c.finish_reason,
                    policy_version=resp.policy_version,
                    policy_versions=list(c.policy_versions) or [resp.policy_version],
                    response_id=c.response_id,
                )
            )
        return out

    def served_version(self) -> str:
        return self.stub.GetPolicy(inference_pb2.GetPolicyRequest(), timeout=self.timeout_s).policy_version


def _wait_unless(fut: Any, interrupt: Callable[[], bool], poll_s: float) -> bool:
    """Wait for ``fut`` to end (well or not: the caller's ``fut.result()`` raises its error), asking
    ``interrupt`` every ``poll_s``; False when it said stop first."""
    while True:
        try:
            fut.exception(timeout=poll_s)  # returns the RPC's error, if any, rather than raising it
            return True
        except grpc.FutureTimeoutError:
            if interrupt():
                return False


class GrpcRewardScorer:
    """Scores with the reward service, in requests of at most ``max_items``."""

    def __init__(self, channel: grpc.Channel, timeout_s: float, max_items: int = 256):
        self.stub = reward_pb2_grpc.RewardServiceStub(channel)
        self.timeout_s = timeout_s
        self.max_items = max_items

    def score(self, pairs: Sequence[tuple[Prompt, str]]) -> tuple[list[float], str]:
        scores: list[float] = []
        versions: set[str] = set()
        for start in range(0, len(pairs), self.max_items):
            chunk = pairs[start : start + self.max_items]
            req = reward_pb2.ScoreRequest(
                items=[reward_pb2.ScoreItem(messages=chat_messages(p), response=r) for p, r in chunk]
            )
            resp = self.stub.Score(req, timeout=self.timeout_s)
            scores += list(resp.scores)
            versions.add(resp.rm_version)
        if len(versions) > 1:
            # The RM was swapped between two chunks: scores on different scales must not be mixed.
            raise RuntimeError(f"reward model changed while scoring ({sorted(versions)}); retry")
        return scores, versions.pop() if versions else ""
