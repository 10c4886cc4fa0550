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
4. ``due``: a round runs once ``learn_every_comparisons`` comparisons arrived that no round has
   seen, or ``learn_every_s`` passed since the last round and at least one has.
5. ``run_round``: warm start from the current RM (verified from the store; the policy backbone
   with a fresh head when there is none), measure its held-out accuracy, train on the new
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

from services.reward import metrics
from services.reward.comparisons import (
    ComparisonGroup,
    PointwiseExample,
    Sample,
    TrainingExamples,
    examples_from_feedback,
    join_texts,
)
from services.reward.config import RewardConfig
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


@dataclass
class Comparisons:
    train: list[LiveComparison] = field(default_factory=list)
    heldout: list[LiveComparison] = field(default_factory=list)
    pending: int = 0
    """Live votes still waiting for a completion."""


@dataclass(frozen=True)
class RoundPlan:
    """The comparisons of one round (see ``RetrainingLoop._plan_round``)."""

    new: list[LiveComparison]
    replayed: list[LiveComparison]
    heldout: list[ComparisonGroup]
    trained_before: int
    """Comparisons some published version was trained on before this round."""

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
    """"published" or "refused"."""
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

    # --- 4. when ----------------------------------------------------------------------------------

    def unseen(self, comps: Comparisons) -> int:
        """Training comparisons that no round has been given yet."""
        trained = self.state.trained_keys()
        return sum(1 for c in comps.train if c.key not in trained and c.key not in self._seen)

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
        self._idle = comps.pending == 0 and self.unseen(comps) == 0
        if not self.due(comps):
            return None
        return self.run_round(comps)

    # --- 5. train, gate, publish ------------------------------------------------------------------

    def run_round(
        self, comps: Comparisons | None = None, *, tamper: Callable[[RewardModel], None] | None = None
    ) -> RoundResult:
        """Train one candidate on the new (+ replayed) comparisons and publish it if it passes the gate.

        ``tamper`` (tests only) damages the candidate after training, before the gate: the way to
        show that a degraded candidate is not published.
        """
        started = time.monotonic()
        comps = comps if comps is not None else self.comparisons()
        plan = self._plan_round(comps)
        base, model, tokenizer = self._load_base()
        trainer = RewardTrainer(model, tokenizer, self.settings)
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
        )
        history = trainer.fit(plan.examples())
        if tamper is not None:
            tamper(model)
        candidate_acc, heldout_loss = trainer.evaluate(plan.heldout)
        train_loss = history[-1].loss if history else math.nan
        decision = rm_gate(candidate_acc, current_acc, self.cfg.gate_tolerance)
        metrics.HELDOUT_ACCURACY.labels("candidate").set(candidate_acc)
        metrics.TRAIN_LOSS.set(train_loss)

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
        )  # fmt: skip
        self.rounds.append(result)
        return result

    def _plan_round(self, comps: Comparisons) -> RoundPlan:
        """What a round trains on: the comparisons no version was trained on yet, ``replay_ratio``
        times as many older ones drawn at random, and the held-out groups it is judged on."""
        trained = self.state.trained_keys()
        new = [c for c in comps.train if c.key not in trained]
        old = [c for c in comps.train if c.key in trained]
        self._seen.update(c.key for c in new)
        self._last_round = self.clock()
        if not new:
            raise ValueError("no new comparisons to train on")
        rng = random.Random(len(trained) + len(new))
        replayed = replay_sample(old, len(new), self.cfg.replay_ratio, rng)
        heldout = [c.example for c in comps.heldout if isinstance(c.example, ComparisonGroup)]
        return RoundPlan(new, replayed, heldout, len(trained))

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
