"""The retraining loop, the reward service's "continual learner": live ratings -> comparisons -> a
gated, versioned reward model. (Its public names keep "learner": RLHF_REWARD_LEARNER*, the Helm
values ``reward.learner.*`` and the metrics ``rlhf_reward_learner_*``; in the code "learner" is
the trainer's PPO learner only.)

Where it runs, and why: inside the reward service process, on its own thread (``RetrainingThread``).
One process then owns the RM line of the model store: the learner publishes rm-NNNN and tells the
scorer next to it to load it at once (other replicas and the PPO trainer follow the
RewardModelEvent on rlhf.reward-models). It needs no extra deployment, and its CPU use is visible
on the same pod. The price: only one reward replica may run the learner (RLHF_REWARD_LEARNER=false
on the others), because two learners would publish competing versions.

The loop (``RetrainingLoop``, no Kafka in it; ratings_feed.py brings the records):

1. ``ingest``: every feedback event and user completion is written to the SQLite state
   (retraining_state.py) together with the topic offsets after it, in one transaction. Votes are
   joined to completion texts by response_id when a round is prepared, so the order in which the
   two topics arrive does not matter.
2. A vote whose completions have not all arrived is *pending*; after ``pending_timeout_s`` it is
   counted (rlhf_reward_learner_votes_dropped_total), logged and dropped, never a crash.
3. ``comparisons``: the live votes become comparison groups and lone thumbs with the rules of
   comparisons.py (ranking -> all C(K,2) pairs, one group; pairwise -> one pair, ties skipped;
   thumbs/Likert -> pairs between differently rated responses of one user to one prompt; a lone
   thumb -> a pointwise logistic term). Each gets a stable key (``comparison_key``) and a side:
   held out or train, by a hash of its prompt (``is_heldout``), so a prompt never leaks from the
   held-out slice into training, and the slice stays the same across rounds and restarts.
4. ``select``: the rules of raters.py decide what a round may use: a quarantined principal's
   comparisons are left out (of training, replay and the held-out slice), and each principal keeps
   at most ``principal_cap`` of the round's new comparisons and of the held-out slice, oldest
   first; the rest wait. ``due``: a round runs once ``learn_every_comparisons`` comparisons that
   the rules admit arrived that no round has seen, or ``learn_every_s`` passed since the last
   round and at least one has.
5. ``run_round``: warm start from the current RM (verified from the store; the policy backbone
   with a fresh head when there is none), judge the raters (``_judge_raters``: the current RM
   scores the comparisons it is about to learn from and, per principal, enough older ones to
   judge it; peer agreement from all live comparisons; quarantine by raters.quarantine_reason),
   select again, measure the current RM's held-out accuracy, train on the new
   comparisons plus ``replay_ratio`` times as many older ones drawn at random from everything
   trained before (the replay buffer is the state file itself: nothing is ever forgotten), measure
   the candidate on the SAME held-out comparisons, and ``rm_gate``: publish only when it did not drop
   by more than ``gate_tolerance``. A published version is normalised first (InstructGPT: the
   reference responses score 0 on average; here the ``reference_responses`` most recent completions
   the policy served), then announced. A refused candidate is thrown away; its comparisons stay
   "new" and are tried again, with whatever arrives next, in the next round.

Trained comparisons are recorded with the first version trained on them; the time from each one's
rating to that version's publication is rlhf_reward_learner_rating_to_rm_seconds.

Details worth knowing: held-out lone thumbs are neither trained on nor scored by the gate (pairwise
accuracy needs pairs). A round that fails (e.g. the current RM no longer verifies) is logged and
its comparisons wait for the next arrival, so a persistent fault does not spin. A round blocks
reading for its duration; at this project's sizes that is seconds (see tests/benchmarks/bench_reward.py).
Each check re-reads the live votes from SQLite (skipped while nothing changed): fine for 10^4-10^5
votes; beyond that the comparisons would be kept incrementally.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from services.reward import metrics
from services.reward.comparisons import (
    ComparisonGroup,
    PointwiseExample,
    Sample,
    TrainingExamples,
    examples_from_feedback,
    join_texts,
    sample_key,
)
from services.reward.config import RewardConfig
from services.reward.domain import RaterList, RaterRecord
from services.reward.raters import (
    QUARANTINED,
    RELEASED,
    RaterScore,
    cap_per_principal,
    largest_share,
    pair_orderings,
    peer_agreements,
    principal_cap,
    quarantine_reason,
    rm_group_agreement,
)
from services.reward.retraining_state import RetrainingState, StoredVote
from services.reward.training import RewardTrainer, TrainSettings, publish_reward_model
from shared.events import CompletionEvent, FeedbackEvent
from shared.logging import get_logger, log_event
from shared.model_store import ModelStore
from shared.models.encoding import EncodingLimits
from shared.models.loading import load_tokenizer, verified_dir
from shared.models.reward_model import RewardModel, load_version
from shared.version_line import REWARD_MODEL, VersionLine

if TYPE_CHECKING:
    from services.reward.ratings_feed import Ingest

log = get_logger(__name__)

Example = ComparisonGroup | PointwiseExample


# --- small pure functions ------------------------------------------------------------------------


def is_heldout(prompt_key: str, fraction: float) -> bool:
    """Stable split by prompt: sha256 of the key read as a number in [0, 1), below ``fraction``."""
    h = int.from_bytes(hashlib.sha256(prompt_key.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def comparison_key(example: Example) -> str:
    """Identity of a comparison: who compared which responses how. A changed vote or a new thumb
    joining a group gives a new key (new information); the same comparison rebuilt gives the same."""
    doc: list[object]
    if isinstance(example, ComparisonGroup):
        doc = [
            "group",
            example.source,
            example.user_id,
            [_rid(r) for r in example.responses],
            [list(p) for p in example.pairs],
        ]
    else:
        doc = ["thumb", example.user_id, _rid(example.response), example.label]
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()[:32]


def _rid(response: object) -> str:
    return response.response_id if isinstance(response, Sample) else str(response)


@dataclass(frozen=True)
class RmGateDecision:
    publish: bool
    reason: str


def rm_gate(candidate_accuracy: float, current_accuracy: float, tolerance: float) -> RmGateDecision:
    """Publish only if the candidate's held-out accuracy >= the current RM's on the same slice - tolerance."""
    if math.isnan(candidate_accuracy):
        return RmGateDecision(False, "no held-out comparisons to judge the candidate on")
    if math.isnan(current_accuracy):
        return RmGateDecision(True, "no current reward model to compare with")
    if candidate_accuracy >= current_accuracy - tolerance:
        return RmGateDecision(
            True, f"held-out accuracy {candidate_accuracy:.3f} >= {current_accuracy:.3f} - {tolerance}"
        )
    return RmGateDecision(
        False, f"held-out accuracy dropped: {candidate_accuracy:.3f} < {current_accuracy:.3f} - {tolerance}"
    )


T = TypeVar("T")


def replay_sample(old: Sequence[T], n_new: int, ratio: float, rng: random.Random) -> list[T]:
    """``round(ratio * n_new)`` older comparisons drawn uniformly without replacement (all if fewer)."""
    k = min(len(old), round(ratio * n_new))
    return rng.sample(list(old), k) if k > 0 else []


def round_due(unseen: int, seconds_since_last: float, every_n: int, every_s: float) -> bool:
    """Every N comparisons no round has seen yet, or every T seconds when at least one arrived."""
    return unseen >= every_n or (unseen > 0 and seconds_since_last >= every_s)


# --- the learner ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveComparison:
    key: str
    example: Example
    """With Samples (texts joined)."""
    heldout: bool
    rated_at: float
    """The latest received_at of the votes it comes from (when the feedback service accepted them)."""

    @property
    def principal(self) -> str:
        return self.example.user_id

    @property
    def order(self) -> tuple[float, str]:
        """Oldest first, then by key: the order in which a principal's comparisons pass its cap."""
        return (self.rated_at, self.key)


@dataclass
class Comparisons:
    train: list[LiveComparison] = field(default_factory=list)
    heldout: list[LiveComparison] = field(default_factory=list)
    pending: int = 0
    """Live votes still waiting for a completion."""


@dataclass(frozen=True)
class Selection:
    """What the rules let into a round (``RetrainingLoop.select``)."""

    new: list[LiveComparison]
    """Not trained yet, not a quarantined principal's, within each principal's cap; oldest first."""
    old: list[LiveComparison]
    """Trained before and not a quarantined principal's: the replay pool."""
    heldout: list[LiveComparison]
    """Held-out comparison groups, not a quarantined principal's, within each principal's cap."""
    trained_before: int
    held_back: dict[str, int]
    """Comparisons left out, by reason: capped, quarantined, heldout_capped, heldout_quarantined."""
    cap: int
    """The round's cap per principal on new comparisons."""


@dataclass(frozen=True)
class RoundPlan:
    """The comparisons of one round (see ``RetrainingLoop._plan_round``)."""

    new: list[LiveComparison]
    replayed: list[LiveComparison]
    heldout: list[ComparisonGroup]
    trained_before: int
    """Comparisons some published version was trained on before this round."""
    held_back: dict[str, int] = field(default_factory=dict)
    """What the rules left out (``Selection.held_back``)."""

    @property
    def heldout_pairs(self) -> int:
        return sum(len(g.pairs) for g in self.heldout)

    def examples(self) -> TrainingExamples:
        chosen = [c.example for c in [*self.new, *self.replayed]]
        return TrainingExamples(
            groups=[e for e in chosen if isinstance(e, ComparisonGroup)],
            pointwise=[e for e in chosen if isinstance(e, PointwiseExample)],
        )


@dataclass(frozen=True)
class RoundResult:
    outcome: str
    """"published", "refused", or "skipped" (judging the raters left nothing new to train on)."""
    reason: str
    version: str | None
    """The published version (None when refused)."""
    base: str
    """What the candidate started from (the current rm version, or the policy for a first RM)."""
    current_accuracy: float
    candidate_accuracy: float
    train_loss: float
    new: int
    replayed: int
    heldout_pairs: int
    seconds: float
    held_back: dict[str, int] = field(default_factory=dict)
    """Comparisons the rules left out of this round, by reason (``Selection.held_back``)."""
    new_by_principal: dict[str, int] = field(default_factory=dict)
    """The round's new comparisons per principal."""
    heldout_by_principal: dict[str, int] = field(default_factory=dict)
    """The held-out comparison groups per principal."""

    @property
    def largest_share(self) -> float:
        """The largest share of one principal in the round's new comparisons (NaN for none)."""
        total = sum(self.new_by_principal.values())
        return max(self.new_by_principal.values()) / total if total else math.nan


class RetrainingLoop:
    """Turns stored ratings into gated RM versions. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        cfg: RewardConfig,
        store: ModelStore,
        state: RetrainingState,
        line: VersionLine | None = None,
        on_published: Callable[[str], object] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.cfg = cfg
        self.store = store
        self.state = state
        self.line = line if line is not None else VersionLine(store, REWARD_MODEL)
        """The rm line it publishes to; with an announcer, each version is announced once stored."""
        self.on_published = on_published
        self.clock = clock
        self.limits = EncodingLimits(cfg.max_tokens, cfg.max_response_tokens)
        self.settings = TrainSettings(
            epochs=cfg.learner_epochs,
            lr=cfg.learner_lr,
            batch_size=cfg.learner_batch_size,
            max_forward_batch=cfg.max_batch_size,
            limits=self.limits,
        )
        self._seen: set[str] = set()
        """Comparison keys some round has already been given (in memory: after a restart every
        untrained comparison counts as unseen, so the first check retrains on them)."""
        self._last_round = clock()
        self.rounds: list[RoundResult] = []
        self._changed = True
        """Something was ingested since the last ``maybe_run_round`` (else its answer can only change
        through the clock: pending timeouts, the T trigger)."""
        self._idle = False
        """The last check found nothing pending and nothing unseen: no point re-reading the state."""
        self.held_back: dict[str, int] = {}
        """What the last round's rules left out, by reason (``Selection.held_back``)."""

    # --- 1. ingest -------------------------------------------------------------------------------

    def ingest(self, events: Sequence[object], offsets: dict[tuple[str, int], int]) -> None:
        """Store a polled batch (FeedbackEvents and CompletionEvents; others ignored) and its offsets."""
        feedback = [e for e in events if isinstance(e, FeedbackEvent)]
        # Only chat traffic is rated: PPO rollouts (source "trainer") never get a feedback token.
        completions = [e for e in events if isinstance(e, CompletionEvent) and e.source == "user"]
        self.state.ingest(feedback, completions, offsets, self.clock())
        self._changed = True
        if feedback:
            metrics.LEARNER_EVENTS.labels("feedback").inc(len(feedback))
        if completions:
            metrics.LEARNER_EVENTS.labels("completion").inc(len(completions))

    # --- 2./3. votes -> comparisons ---------------------------------------------------------------

    def comparisons(self) -> Comparisons:
        """Live comparisons with texts, split held out / train; drops votes pending for too long."""
        now = self.clock()
        votes = self.state.live_votes()
        texts = self.state.completions(r.response_id for v in votes for r in v.event.responses)
        ready: list[StoredVote] = []
        expired: list[StoredVote] = []
        pending = 0
        for v in votes:
            if all(r.response_id in texts for r in v.event.responses):
                ready.append(v)
            elif now - v.arrived_at > self.cfg.pending_timeout_s:
                expired.append(v)
            else:
                pending += 1
        if expired:
            self.state.mark_dropped([(v.event.user_id, v.event.target) for v in expired], now)
            metrics.VOTES_DROPPED.inc(len(expired))
            for v in expired:
                missing = [r.response_id for r in v.event.responses if r.response_id not in texts]
                log_event(
                    log,
                    "dropping a vote whose completion never arrived",
                    level=30,
                    feedback_id=v.event.feedback_id,
                    kind=v.event.kind,
                    missing=",".join(missing),
                    waited_s=round(now - v.arrived_at, 1),
                )
        metrics.VOTES_PENDING.set(pending)

        events = [v.event for v in ready]
        joined = join_texts(examples_from_feedback(events), texts)
        for reason in (
            "pairwise_tie",
            "ranking_all_tied",
            "likert_without_contrast",
            "identical_response_pairs",
            "malformed",
            "unknown_kind",
        ):
            metrics.VOTES_UNUSED.labels(reason).set(joined.skipped.get(reason, 0))
        prompt_of = {r.response_id: r.prompt_hash or r.response_id for ev in events for r in ev.responses}
        rated_at = {(ev.user_id, r.response_id): ev.received_at for ev in events for r in ev.responses}
        out = Comparisons(pending=pending)
        examples: list[Example] = [*joined.groups, *joined.pointwise]
        for ex in examples:
            responses = ex.responses if isinstance(ex, ComparisonGroup) else (ex.response,)
            when = max(rated_at.get((ex.user_id, s.response_id), 0.0) for s in responses)
            held = is_heldout(
                prompt_of.get(responses[0].response_id, responses[0].response_id), self.cfg.heldout_fraction
            )
            lc = LiveComparison(comparison_key(ex), ex, held, when)
            (out.heldout if held else out.train).append(lc)
        return out

    # --- 4. what the rules admit, and when -------------------------------------------------------

    def select(self, comps: Comparisons, trained: dict[str, str] | None = None) -> Selection:
        """The comparisons a round may use: quarantined principals' left out everywhere, each
        principal capped (raters.principal_cap, oldest first) in the new ones and in the held-out
        slice. Deterministic: the same state gives the same selection."""
        trained = self.state.trained_keys() if trained is None else trained
        out = {p for p, status in self.state.rater_statuses().items() if status == QUARANTINED}
        held_back: dict[str, int] = {}

        def admit(pool: list[LiveComparison], prefix: str) -> tuple[list[LiveComparison], int]:
            kept = sorted((c for c in pool if c.principal not in out), key=lambda c: c.order)
            held_back[prefix + "quarantined"] = len(pool) - len(kept)
            counts: dict[str, int] = {}
            for c in kept:
                counts[c.principal] = counts.get(c.principal, 0) + 1
            cap = principal_cap(counts, self.cfg.max_principal_share, self.cfg.min_principal_cap)
            kept, waiting = cap_per_principal(kept, lambda c: c.principal, cap)
            held_back[prefix + "capped"] = len(waiting)
            return kept, cap

        new, cap = admit([c for c in comps.train if c.key not in trained], "")
        heldout, _ = admit([c for c in comps.heldout if isinstance(c.example, ComparisonGroup)], "heldout_")
        old = [c for c in comps.train if c.key in trained and c.principal not in out]
        return Selection(new, old, heldout, len(trained), held_back, cap)

    def unseen(self, comps: Comparisons) -> int:
        """Training comparisons the rules admit that no round has been given yet."""
        return sum(1 for c in self.select(comps).new if c.key not in self._seen)

    def due(self, comps: Comparisons) -> bool:
        return round_due(
            self.unseen(comps),
            self.clock() - self._last_round,
            self.cfg.learn_every_comparisons,
            self.cfg.learn_every_s,
        )

    def maybe_run_round(self) -> RoundResult | None:
        """Run a round if one is due (called about once a second by the learner thread)."""
        if self._idle and not self._changed:
            return None
        self._changed = False
        comps = self.comparisons()
        unseen = self.unseen(comps)
        self._idle = comps.pending == 0 and unseen == 0
        if not round_due(
            unseen, self.clock() - self._last_round, self.cfg.learn_every_comparisons, self.cfg.learn_every_s
        ):
            return None
        return self.run_round(comps)

    # --- 5. judge, train, gate, publish -------------------------------------------------------------

    def run_round(
        self, comps: Comparisons | None = None, *, tamper: Callable[[RewardModel], None] | None = None
    ) -> RoundResult:
        """Judge the raters, then train one candidate on the new (+ replayed) comparisons the rules
        admit and publish it if it passes the gate.

        ``tamper`` (tests only) damages the candidate after training, before the gate: the way to
        show that a degraded candidate is not published.
        """
        started = time.monotonic()
        comps = comps if comps is not None else self.comparisons()
        base, model, tokenizer = self._load_base()
        trainer = RewardTrainer(model, tokenizer, self.settings)
        self._judge_raters(trainer, base, comps)
        selection = self.select(comps)
        self._show_selection(selection)
        self._last_round = self.clock()
        if not selection.new:
            return self._skipped(base, selection, started)
        plan = self._plan_round(selection)
        current_acc, _ = trainer.evaluate(plan.heldout)
        log_event(
            log,
            "reward model round",
            base=base,
            new=len(plan.new),
            replayed=len(plan.replayed),
            heldout_comparisons=len(plan.heldout),
            heldout_pairs=plan.heldout_pairs,
            pending=comps.pending,
            **{f"held_back_{k}": v for k, v in plan.held_back.items() if v},
        )
        history = trainer.fit(plan.examples())
        if tamper is not None:
            tamper(model)
        candidate_acc, heldout_loss = trainer.evaluate(plan.heldout)
        train_loss = history[-1].loss if history else math.nan
        decision = rm_gate(candidate_acc, current_acc, self.cfg.gate_tolerance)
        metrics.HELDOUT_ACCURACY.labels("candidate").set(candidate_acc)
        metrics.TRAIN_LOSS.set(train_loss)
        new_by_principal = _by_principal(plan.new)
        heldout_by_principal = _by_principal(selection.heldout)

        version = None
        if decision.publish:
            round_metrics = {
                "heldout_accuracy": candidate_acc,
                "heldout_accuracy_before": current_acc,
                "heldout_loss": heldout_loss,
                "train_loss": train_loss,
                "new_comparisons": len(plan.new),
                "replayed_comparisons": len(plan.replayed),
                "heldout_comparisons": len(plan.heldout),
                "heldout_pairs": plan.heldout_pairs,
                "trained_comparisons_total": plan.trained_before + len(plan.new),
                "epochs": self.settings.epochs,
                "round_seconds": round(time.monotonic() - started, 2),
                "principals": len(new_by_principal),
                "largest_principal_share": largest_share(c.principal for c in plan.new),
                "heldout_largest_principal_share": largest_share(c.principal for c in selection.heldout),
                "capped_comparisons": plan.held_back.get("capped", 0),
                "quarantined_comparisons": plan.held_back.get("quarantined", 0),
            }
            version = self._publish(base, model, tokenizer, plan.new, plan.replayed, comps, round_metrics)
            metrics.HELDOUT_ACCURACY.labels("current").set(candidate_acc)
        else:
            log_event(
                log,
                "candidate reward model refused by the gate; keeping the current one",
                level=30,
                base=base,
                reason=decision.reason,
            )
        seconds = time.monotonic() - started
        outcome = "published" if version else "refused"
        metrics.ROUNDS.labels(outcome).inc()
        metrics.ROUND_SECONDS.observe(seconds)
        result = RoundResult(
            outcome, decision.reason, version, base, current_acc, candidate_acc, train_loss,
            len(plan.new), len(plan.replayed), plan.heldout_pairs, seconds,
            dict(plan.held_back), new_by_principal, heldout_by_principal,
        )  # fmt: skip
        self.rounds.append(result)
        return result

    def _skipped(self, base: str, selection: Selection, started: float) -> RoundResult:
        reason = "nothing new to train on once the raters were judged"
        log_event(log, "reward model round skipped", level=30, base=base, reason=reason, **selection.held_back)
        metrics.ROUNDS.labels("skipped").inc()
        result = RoundResult(
            "skipped", reason, None, base, math.nan, math.nan, math.nan, 0, 0,
            sum(len(c.example.pairs) for c in selection.heldout if isinstance(c.example, ComparisonGroup)),
            time.monotonic() - started, dict(selection.held_back), {}, _by_principal(selection.heldout),
        )  # fmt: skip
        self.rounds.append(result)
        return result

    def _show_selection(self, selection: Selection) -> None:
        self.held_back = dict(selection.held_back)
        for key, n in selection.held_back.items():
            side, _, reason = key.rpartition("_")
            metrics.HELD_BACK.labels(reason, side or "train").set(n)
        metrics.LARGEST_SHARE.labels("train").set(largest_share(c.principal for c in selection.new))
        metrics.LARGEST_SHARE.labels("heldout").set(largest_share(c.principal for c in selection.heldout))

    def _plan_round(self, selection: Selection) -> RoundPlan:
        """What a round trains on: the admitted comparisons no version was trained on yet,
        ``replay_ratio`` times as many older ones drawn at random, and the held-out groups it is
        judged on."""
        new = selection.new
        self._seen.update(c.key for c in new)
        if not new:
            raise ValueError("no new comparisons to train on")
        rng = random.Random(selection.trained_before + len(new))
        replayed = replay_sample(selection.old, len(new), self.cfg.replay_ratio, rng)
        heldout = [c.example for c in selection.heldout if isinstance(c.example, ComparisonGroup)]
        return RoundPlan(new, replayed, heldout, selection.trained_before, dict(selection.held_back))

    # --- rater quality -----------------------------------------------------------------------------

    def _judge_raters(self, trainer: RewardTrainer, base: str, comps: Comparisons) -> None:
        """Score with the current RM what it has not judged yet (the comparisons this round would
        use, and per principal enough older ones to reach ``quarantine_min_items`` pairs), compute
        every principal's agreement scores, store them, and quarantine by raters.quarantine_reason."""
        now = self.clock()
        statuses = self.state.rater_statuses()
        if base == self.store.current("rm"):  # a first RM (fresh head on the policy) judges nothing
            self._rm_verdicts(trainer, base, comps, statuses)
        groups = [c for c in [*comps.train, *comps.heldout] if isinstance(c.example, ComparisonGroup)]
        peers = peer_agreements(
            pair_orderings(c.example for c in groups if isinstance(c.example, ComparisonGroup)),
            lambda p: statuses.get(p) != QUARANTINED,
        )
        rm_totals = self.state.rm_agreement_totals()
        live = _by_principal([*comps.train, *comps.heldout])
        scores: dict[str, tuple[RaterScore, int]] = {}
        for p, n in live.items():
            peer, peer_n = peers.get(p, (math.nan, 0))
            agree, rm_n = rm_totals.get(p, (0.0, 0))
            scores[p] = (RaterScore(peer, peer_n, agree / rm_n if rm_n else math.nan, rm_n), n)
        self.state.update_raters(scores, now)
        for p, (score, _) in scores.items():
            if statuses.get(p) in (QUARANTINED, RELEASED):
                continue
            reason = quarantine_reason(score, self.cfg.quarantine_below, self.cfg.quarantine_min_items)
            if reason and self.state.quarantine(p, reason, now):
                judge = "peers" if score.peer_items >= self.cfg.quarantine_min_items else "rm"
                metrics.QUARANTINES.labels(judge).inc()
                log_event(log, "rater quarantined", level=30, principal=p, reason=reason)
        for status, n in self.state.rater_counts().items():
            metrics.RATERS.labels(status).set(n)

    def _rm_verdicts(self, trainer: RewardTrainer, base: str, comps: Comparisons, statuses: dict[str, str]) -> None:
        """Have the current RM order the pairs of the comparisons it has not judged yet: those the
        round would use now, and per principal still being judged its oldest others until it has
        ``quarantine_min_items`` scored pairs. Each comparison is scored once, by the RM current then."""
        judged = self.state.rm_verdict_keys()
        totals = self.state.rm_agreement_totals()
        selection = self.select(comps)
        todo: dict[str, LiveComparison] = {
            c.key: c
            for c in [*selection.new, *selection.heldout]
            if c.key not in judged and isinstance(c.example, ComparisonGroup)
        }
        pairs = {p: n for p, (_, n) in totals.items()}
        for c in todo.values():
            pairs[c.principal] = pairs.get(c.principal, 0) + len(c.example.pairs)  # type: ignore[union-attr]
        for c in sorted([*comps.train, *comps.heldout], key=lambda c: c.order):
            p = c.principal
            if (
                isinstance(c.example, ComparisonGroup)
                and c.key not in judged
                and c.key not in todo
                and p not in statuses
                and pairs.get(p, 0) < self.cfg.quarantine_min_items
            ):
                todo[c.key] = c
                pairs[p] = pairs.get(p, 0) + len(c.example.pairs)
        if not todo:
            return
        groups = [c.example for c in todo.values() if isinstance(c.example, ComparisonGroup)]
        distinct = {sample_key(s): s for g in groups for s in g.responses}
        index = {k: i for i, k in enumerate(distinct)}
        trainer.model.eval()
        with torch.no_grad():
            rewards = trainer.scores(list(distinct.values())).tolist()
        rows = []
        for c, g in zip(todo.values(), groups):
            r = [rewards[index[sample_key(s)]] for s in g.responses]
            rows.append((c.key, c.principal, base, rm_group_agreement(r, g.pairs), len(g.pairs)))
        self.state.record_rm_verdicts(rows)
        metrics.RM_VERDICTS.inc(len(rows))

    def list_raters(self, quarantined_only: bool = False, limit: int = 100) -> RaterList:
        """The raters the loop has judged (quarantined first, lowest agreement first), for operators.
        Safe from another thread (SQLite behind the state's lock)."""
        counts = self.state.rater_counts()
        return RaterList(
            self.state.raters(QUARANTINED if quarantined_only else None, limit),
            sum(counts.values()),
            counts[QUARANTINED],
            dict(self.held_back),
        )

    def release_rater(self, principal: str) -> RaterRecord:
        """An operator releases a quarantined principal: its ratings count again from the next round,
        and the rule no longer judges it. Safe from another thread."""
        record = self.state.release(principal, self.clock())
        metrics.RELEASES.inc()
        for status, n in self.state.rater_counts().items():
            metrics.RATERS.labels(status).set(n)
        self._changed = True
        self._idle = False
        log_event(log, "rater released by an operator", principal=principal)
        return record

    def _load_base(self) -> tuple[str, RewardModel, Any]:
        """(version it started from, a trainable copy, tokenizer): the current RM, verified; or, for
        the very first RM, the current policy's backbone with a fresh head."""
        current = self.store.current("rm")
        if current:
            loaded = load_version(self.store, current)
            return current, loaded.model, loaded.tokenizer
        policy = self.store.current("policy")
        if not policy:
            raise ValueError(f"no reward model and no policy in the model store at {self.store.root}")
        policy_dir = verified_dir(self.store, policy)
        return policy, RewardModel.from_policy_dir(policy_dir), load_tokenizer(policy_dir)

    def _publish(
        self,
        base: str,
        model: RewardModel,
        tokenizer: Any,
        new: list[LiveComparison],
        replayed: list[LiveComparison],
        comps: Comparisons,
        round_metrics: dict[str, float],
    ) -> str:
        trainer = RewardTrainer(model, tokenizer, self.settings)
        reference = [
            Sample(c.messages, c.completion_text, c.response_id, c.policy_version)
            for c in self.state.recent_completions(self.cfg.reference_responses)
        ]
        offset = trainer.normalise(reference, "the most recent completions served to users")
        model.info.update(
            {
                "trained_max_tokens": self.limits.max_tokens,
                "trained_max_response_tokens": self.limits.max_response_tokens,
            }
        )
        sources: dict[str, int] = {}
        for c in new:
            kind = c.example.source if isinstance(c.example, ComparisonGroup) else "lone-thumb"
            sources[kind] = sources.get(kind, 0) + 1
        extra = {
            "kind": "live-ratings",
            "base": base,
            "new_by_source": sources,
            "lr": self.settings.lr,
            "batch_size": self.settings.batch_size,
            "replay_ratio": self.cfg.replay_ratio,
            "heldout_fraction": self.cfg.heldout_fraction,
            "gate_tolerance": self.cfg.gate_tolerance,
            "offset_reference": model.info.get("offset_reference", ""),
        }
        manifest = publish_reward_model(
            self.line, model, tokenizer, parent=base, metrics={**round_metrics, "offset": offset}, extra=extra
        )
        now = self.clock()
        self.state.mark_trained([c.key for c in new], manifest.version, now)
        metrics.COMPARISONS_TRAINED.inc(len(new))
        metrics.COMPARISONS_REPLAYED.inc(len(replayed))
        for c in new:
            if c.rated_at > 0:
                metrics.RATING_TO_RM_SECONDS.observe(max(0.0, now - c.rated_at))
        log_event(
            log,
            "published reward model",
            version=manifest.version,
            parent=base,
            heldout_accuracy=round(round_metrics["heldout_accuracy"], 3),
            before=_round(round_metrics["heldout_accuracy_before"]),
            new=len(new),
            replayed=len(replayed),
        )
        if self.on_published is not None:
            self.on_published(manifest.version)
        # Stored and recorded as trained: now tell the other replicas and the trainer. Owed until
        # Kafka acknowledges it (the store remembers), so a crash here announces it on restart.
        self.line.announce_pending()
        return manifest.version

    def housekeeping(self) -> None:
        """Forget completions nobody rated within the retention time."""
        forgotten = self.state.prune_completions(self.clock() - self.cfg.completion_retention_s)
        if forgotten:
            log_event(log, "forgot unrated completions", count=forgotten)


def _round(x: float) -> float | str:
    return "n/a" if math.isnan(x) else round(x, 3)


def _by_principal(comparisons: Sequence[LiveComparison]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in comparisons:
        out[c.principal] = out.get(c.principal, 0) + 1
    return out


# --- the thread that drives it -------------------------------------------------------------------


class RatingsSource(Protocol):
    """Where RetrainingThread reads ratings: a ratings_feed.RatingsFeed."""

    def poll(self, ingest: Ingest) -> int: ...

    def update_lag(self) -> object: ...

    def close(self) -> None: ...


class RetrainingThread:
    """Polls the topics into the learner and runs rounds when due, until stopped.

    ``feed`` is a ratings_feed.RatingsFeed (or anything with ``poll(ingest)`` and ``update_lag()``).
    Training blocks polling for the length of a round; the records wait on the broker (the lag
    metric shows it) and are read right after.
    """

    def __init__(self, learner: RetrainingLoop, feed: RatingsSource, check_every_s: float = 1.0):
        self.learner = learner
        self.feed = feed
        self.check_every_s = check_every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reward-learner", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log_event(log, "learner still in a round at shutdown; abandoning it", level=30)
            self._thread = None

    def _run(self) -> None:
        last_check = last_housekeeping = 0.0
        try:
            while not self._stop.is_set():
                try:
                    self.feed.poll(self.learner.ingest)
                    now = time.monotonic()
                    if now - last_check >= self.check_every_s:
                        last_check = now
                        self.feed.update_lag()
                        self.learner.maybe_run_round()
                        self.learner.line.announce_pending()  # one a failed send (or a crash) left owed
                    if now - last_housekeeping >= 3600:
                        last_housekeeping = now
                        self.learner.housekeeping()
                except Exception:
                    self.failures += 1
                    log.exception("learner step failed; retrying after a pause")
                    self._stop.wait(5.0)
        finally:
            self.feed.close()
