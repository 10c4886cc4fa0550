"""The publish gate and publication: a candidate reaches users only if it stays near the reference
policy and does not score worse than the version it would replace.

    publisher = PolicyPublisher(store, announcer, scorer, heldout_prompts, kl_bound=10.0, reward_tolerance=0.0)
    evaluation = publisher.evaluate(learner)                     # held-out reward and KL to the reference
    decision = policy_gate(evaluation, baseline_reward, kl_bound, reward_tolerance, baseline_scores, reward_z)
    if decision.ok:
        manifest = publisher.publish(learner, parent="policy-0002", evaluation=evaluation, ...)

**Evaluation** (``evaluate``): on the held-out prompts (never trained on) the candidate samples
``samples`` answers per prompt (temperature 1, no top-k/top-p, one fixed seed: the same random
draws for every candidate, so two policies with the same weights give the same answers and a
policy whose sampling distribution moved gives other answers even where its most likely answer did
not), and the reward service scores them all: their mean is the *held-out reward*. The answers are
laid out prompt-major (``samples`` consecutive answers per prompt). The KL uses the same answers:
for each the learner sums the exact per-token KL(pi(.|prefix) || pi_ref(.|prefix)) over the
vocabulary; since the answers are samples of pi, the mean estimates the sequence-level KL(pi ||
pi_ref) per answer, and is never negative. ``samples=0`` is the older evaluation: one greedy answer
per prompt for the reward (blind to a change that keeps every argmax) and one sample per prompt for
the KL. An empty answer (EOS first), which the reward service cannot score, counts as the worst
scored answer of the same evaluation, so answering nothing never raises the mean.

**The gate** (``policy_gate``): KL <= kl_bound, and the held-out reward did not fall below the
baseline's by more than reward_tolerance *with confidence* (``reward_fell``: the candidate's and
the baseline's scores paired by prompt, refused when the upper ``reward_z`` confidence bound of the
mean difference is below -reward_tolerance; ``reward_z=0`` is the plain comparison), where the
baseline is the last published version's evaluation (its answers re-scored when the reward model
changed since). Sampled answers make the figure move with the policy, and also make it noisy: the
plain comparison refuses a candidate as good as the baseline about half the time, and more often
against a baseline that passed the gate on a lucky draw. A policy that games the reward model
typically drifts far from the reference (the KL bound) or gets worse on prompts it was not trained
on (the reward bound).

**Publication** (``publish``): the learner writes the policy (safetensors: full weights, or with
LoRA only the adapter, whose manifest then names its base version in ``extra["adapter"]``, see
shared/models/adapters.py) to a staging directory inside the model store; the
policy line (shared/version_line.py) moves it into a new version (no second write), hashes every file into the
manifest (parent version, RM version used, the metrics), signs it with the trainer's key, renames
it into place atomically and makes it current. Its announcement on rlhf.policy-updates is then owed until ``announce_pending``
gets Kafka's acknowledgement; inference replicas verify and hot-swap it.

**Rollout mode** (``kind=POLICY_CANDIDATE``, RLHF_TRAINER_ROLLOUT): the same, on the policy line's
``candidate`` pointer instead of ``current``: the version becomes the trainer's candidate, announced
on rlhf.policy-candidates, and the rollout service (services/rollout) decides whether users get it
(canary, then promotion or rollback). A rollback then points the candidate back (the trainer trains
on from that version); what users are served is changed with `rlhf rollout`, not here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.trainer.prompts import Prompt
from services.trainer.rollout_batch import Rollout
from services.trainer.rollout_collector import Scorer
from shared.logging import get_logger, log_event
from shared.model_store import Manifest, ModelStore
from shared.models.encoding import render_prompt
from shared.signing import SigningKey
from shared.version_line import POLICY, Announcer, LineKind, PendingAnnouncement, VersionLine

log = get_logger(__name__)

EVAL_SEED = 1234
"""Seed of the held-out samples: the same draws for every candidate."""


@dataclass(frozen=True)
class Evaluation:
    heldout_reward: float
    """Mean RM score of the candidate's held-out answers (``samples`` per prompt, or greedy)."""
    kl: float
    """Mean over sampled held-out answers of the summed per-token KL(pi || pi_ref), nats per answer."""
    rm_version: str
    answers: list[str] = field(default_factory=list)
    """The held-out answers, prompt-major (kept so that a later RM version, and the guards, can
    score the baseline's)."""
    empty_answers: int = 0
    samples: int = 1
    """Answers per held-out prompt (1 for the greedy evaluation)."""
    scores: list[float] = field(default_factory=list)
    """The RM score of each answer, laid out as ``answers`` (the paired reward test uses them)."""


@dataclass(frozen=True)
class PolicyGateDecision:
    ok: bool
    reason: str
    check: str = ""
    """The check that refused (``not_finite``, ``kl``, ``reward``, ``rm_changed`` or a guard's
    name: the ``reason`` label of rlhf_trainer_gate_refused_total); empty when ok."""


# --- pure rules -------------------------------------------------------------------------------


def paired_difference(candidate: Sequence[float], baseline: Sequence[float], n_prompts: int) -> tuple[float, float]:
    """(mean, standard error) of the candidate's per-prompt score difference to the baseline's:

        d_i = mean of prompt i's candidate scores - mean of prompt i's baseline scores
        mean = (1/n) sum_i d_i,    se = sd(d) / sqrt(n)    (sd with n - 1 in the denominator)

    Scores are laid out prompt-major, any whole number per prompt (``expand_prompts``); se is 0 for
    one prompt. Pairing by prompt removes the prompts' own spread from the comparison."""

    def per_prompt(scores: Sequence[float]) -> list[float]:
        per = len(scores) // n_prompts
        return [mean(scores[i * per : (i + 1) * per]) for i in range(n_prompts)]

    d = [c - b for c, b in zip(per_prompt(candidate), per_prompt(baseline), strict=True)]
    m = mean(d)
    if len(d) < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in d) / (len(d) - 1)
    return m, math.sqrt(var / len(d))


def reward_fell(
    candidate: Sequence[float], baseline: Sequence[float], n_prompts: int, tolerance: float, z: float
) -> tuple[bool, float, float]:
    """Whether the candidate's held-out reward fell below the baseline's by more than ``tolerance``
    with confidence: ``mean + z * se < -tolerance`` (``paired_difference``; z = 1.64 is a one-sided
    95% bound, z = 0 the plain comparison of the two means). Returns (fell, mean, se)."""
    m, se = paired_difference(candidate, baseline, n_prompts)
    return m + z * se < -tolerance, m, se


def pairable(candidate: Sequence[float], baseline: Sequence[float] | None, n_prompts: int) -> bool:
    """Both score lists are laid out over the same ``n_prompts`` prompts (whole numbers per prompt)."""
    return (
        baseline is not None
        and n_prompts > 0
        and len(candidate) > 0
        and len(baseline) > 0
        and len(candidate) % n_prompts == 0
        and len(baseline) % n_prompts == 0
    )


def policy_gate(
    evaluation: Evaluation,
    baseline_reward: float | None,
    kl_bound: float,
    reward_tolerance: float,
    baseline_scores: Sequence[float] | None = None,
    reward_z: float = 0.0,
    n_prompts: int = 0,
) -> PolicyGateDecision:
    """Whether a candidate may be published; the reason names the figures either way. With the
    baseline's scores (and ``n_prompts``) the reward bound is ``reward_fell``'s paired test, else
    the plain comparison of the two means."""
    r, kl = evaluation.heldout_reward, evaluation.kl
    if not (math.isfinite(r) and math.isfinite(kl)):
        return PolicyGateDecision(False, f"evaluation is not finite (reward {r}, KL {kl})", "not_finite")
    if kl > kl_bound:
        return PolicyGateDecision(False, f"KL to the reference {kl:.4f} exceeds the bound {kl_bound:.4f}", "kl")
    if baseline_reward is not None and reward_z > 0 and pairable(evaluation.scores, baseline_scores, n_prompts):
        assert baseline_scores is not None
        fell, diff, se = reward_fell(evaluation.scores, baseline_scores, n_prompts, reward_tolerance, reward_z)
        if fell:
            return PolicyGateDecision(
                False,
                f"held-out reward fell: {r:.4f} against {baseline_reward:.4f}, difference {diff:+.4f} "
                f"+ {reward_z:g} x {se:.4f} < -{reward_tolerance:.4f}",
                "reward",
            )
    elif baseline_reward is not None and r < baseline_reward - reward_tolerance:
        return PolicyGateDecision(
            False, f"held-out reward fell: {r:.4f} < {baseline_reward:.4f} - {reward_tolerance:.4f}", "reward"
        )
    bar = "no baseline" if baseline_reward is None else f"baseline {baseline_reward:.4f}"
    return PolicyGateDecision(True, f"held-out reward {r:.4f} ({bar}), KL {kl:.4f} <= {kl_bound:.4f}")


def with_guards(decision: PolicyGateDecision, results: Sequence[Any]) -> PolicyGateDecision:
    """The gate's decision once the guards' results (guards.GuardResult: name, ok, reason) are in:
    a refusal of the gate stands; else the first guard that refused refuses; else it passes, its
    reason naming every guard's figure."""
    if not decision.ok:
        return decision
    for r in results:
        if not r.ok:
            return PolicyGateDecision(False, f"guard {r.reason}", r.name)
    if not results:
        return decision
    return PolicyGateDecision(True, decision.reason + "; guards: " + "; ".join(r.reason for r in results))


SAME_FIGURE_TOLERANCE = 1e-6
"""Relative difference under which two held-out figures count as the same (identical answers can
score a few float bits apart when the reward service batches them differently)."""


def same_figure(candidate: float, baseline: float, tolerance: float = SAME_FIGURE_TOLERANCE) -> bool:
    """|candidate - baseline| <= tolerance * max(1, |baseline|): the gate saw no difference."""
    return abs(candidate - baseline) <= tolerance * max(1.0, abs(baseline))


def answers_changed(candidate: Sequence[str], baseline: Sequence[str]) -> int:
    """How many answers differ position by position (all of the candidate's when the layouts differ)."""
    if len(candidate) != len(baseline):
        return len(candidate)
    return sum(a != b for a, b in zip(candidate, baseline))


def fill_empty_scores(scores: Sequence[float | None]) -> list[float]:
    """Scores with each unscored (empty) answer set to the worst scored one (0 when none was scored)."""
    scored = [s for s in scores if s is not None]
    worst = min(scored) if scored else 0.0
    return [worst if s is None else float(s) for s in scores]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def expand_prompts(heldout: Sequence[Prompt], n_answers: int) -> list[Prompt]:
    """The prompt of each of ``n_answers`` answers laid out prompt-major: answer i answers prompt
    ``i // (n_answers / len(heldout))``. ValueError when the count is not a multiple."""
    if not heldout or n_answers % len(heldout):
        raise ValueError(f"{n_answers} answers do not divide among {len(heldout)} held-out prompts")
    per = n_answers // len(heldout)
    return [p for p in heldout for _ in range(per)]


# --- evaluation and publication ---------------------------------------------------------------


class PolicyPublisher:
    def __init__(
        self,
        store: ModelStore,
        announcer: Announcer,
        scorer: Scorer,
        heldout: Sequence[Prompt],
        *,
        max_tokens: int,
        signer: SigningKey | None = None,
        samples: int = 4,
        kind: LineKind = POLICY,
    ):
        if not heldout:
            raise ValueError("the publish gate needs at least one held-out prompt")
        if samples < 0:
            raise ValueError(f"samples must not be negative, got {samples}")
        self.store = store
        self.line = VersionLine(store, kind, announcer, signer=signer)
        """The policy line: publication, rollback and the announcement owed, signed with the
        trainer's key (versions and announcements; inference replicas refuse anything else). Its
        pointer is ``current`` (POLICY), or ``candidate`` in rollout mode (POLICY_CANDIDATE)."""
        self.scorer = scorer
        self.heldout = list(heldout)
        self.max_tokens = max_tokens
        self.samples = samples
        """Answers sampled per held-out prompt; 0: one greedy answer (see the module docstring)."""

    def prompt_ids(self, learner: Any) -> list[list[int]]:
        return [render_prompt(learner.tokenizer, p) for p in self.heldout]

    def score_answers(self, answers: Sequence[str]) -> tuple[list[float], str, int]:
        """(scores, RM version, empty answers) of held-out answers laid out prompt-major
        (``expand_prompts``: any whole number of answers per prompt)."""
        prompts = expand_prompts(self.heldout, len(answers))
        idx = [i for i, a in enumerate(answers) if a.strip()]
        scores: list[float | None] = [None] * len(answers)
        rm_version = ""
        if idx:
            got, rm_version = self.scorer.score([(prompts[i], answers[i]) for i in idx])
            for i, s in zip(idx, got, strict=True):
                scores[i] = s
        return fill_empty_scores(scores), rm_version, len(answers) - len(idx)

    def evaluate(self, learner: Any) -> Evaluation:
        """Held-out reward (``samples`` sampled answers per prompt, or greedy ones, scored by the
        reward service) and KL (sampled answers); see the module docstring."""
        prompts = self.prompt_ids(learner)
        per = self.samples or 1
        batch = [ids for ids in prompts for _ in range(per)]
        sampled = learner.generate(batch, self.max_tokens, greedy=False, seed=EVAL_SEED)
        if self.samples:
            answers = [learner.tokenizer.decode(ids, skip_special_tokens=True) for ids in sampled]
        else:
            greedy = learner.generate(prompts, self.max_tokens, greedy=True)
            answers = [learner.tokenizer.decode(ids, skip_special_tokens=True) for ids in greedy]
        scores, rm_version, empty = self.score_answers(answers)
        probes = [
            Rollout(
                messages=list(p),
                prompt_token_ids=ids,
                response_token_ids=resp,
                behaviour_logprobs=None,
                policy_version=learner.weights_version,
                finish_reason="stop",
                score=0.0,
            )
            for p, ids, resp in zip(expand_prompts(self.heldout, len(batch)), batch, sampled)
            if resp
        ]
        kl = learner.kl_to_reference(probes) if probes else 0.0
        return Evaluation(mean(scores), float(kl), rm_version, answers, empty, per, scores)

    def rescore(self, answers: Sequence[str]) -> tuple[list[float], str]:
        """Scores of earlier held-out answers (prompt-major, any number per prompt) under the
        current reward model (baseline refresh), and that model's version."""
        scores, rm_version, _ = self.score_answers(answers)
        return scores, rm_version

    def publish(
        self,
        learner: Any,
        *,
        parent: str,
        evaluation: Evaluation,
        baseline_reward: float | None,
        extra: dict[str, Any],
        metrics: dict[str, float] | None = None,
    ) -> Manifest:
        """Write the candidate to the store (atomic, a digest per file in the manifest) and point the line's pointer
        at it (current, or the candidate pointer in rollout mode); its announcement is owed from
        then on (``announce_pending``)."""
        all_metrics = {
            "heldout_reward": evaluation.heldout_reward,
            "kl_to_reference": evaluation.kl,
            **({"baseline_reward": baseline_reward} if baseline_reward is not None else {}),
            **(metrics or {}),
        }
        all_metrics = {k: float(v) for k, v in all_metrics.items() if v is not None and math.isfinite(v)}
        with self.store.staging() as tmp:  # written once, inside the store, and moved into the version
            out = tmp / "policy"
            hashed = learner.save_policy(out, digest=self.store.digest)
            manifest = self.line.publish(
                out,
                parent=parent,
                metrics=all_metrics,
                extra={"rm_version": evaluation.rm_version, "kind": "ppo", **extra, **learner.version_extra()},
                move=True,
                hashed=hashed,
            )
        log_event(
            log,
            "published policy",
            pointer=self.line.kind.pointer,
            version=manifest.version,
            parent=parent,
            heldout_reward=round(evaluation.heldout_reward, 4),
            kl=round(evaluation.kl, 4),
        )
        return manifest

    def pending_announcement(self) -> PendingAnnouncement | None:
        return self.line.pending_announcement()

    def announce_pending(self) -> Any | None:
        """Announce the owed publish or rollback; the event sent, or None (nothing owed, or Kafka
        did not acknowledge: still owed, retried on the next call)."""
        return self.line.announce_pending()

    @property
    def rollout(self) -> bool:
        """True when versions become candidates for the rollout service (not current)."""
        return self.line.kind.pointer != POLICY.pointer

    def rollback(self, version: str) -> Manifest:
        """Point the line's pointer (policy.current, or policy.candidate in rollout mode) at an
        earlier version (verified first); its announcement is owed."""
        return self.line.set_current(version)
