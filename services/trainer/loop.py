"""The trainer's work, without any network of its own: sample -> score -> PPO step -> gate -> publish.

    loop = TrainingLoop(learner, state, mixer, collector, publisher, checkpoints, settings, load_learner)
    thread = threading.Thread(target=loop.run, args=(stop_event,))    # what the app does
    loop.pause(); loop.resume(); loop.status()
    loop.publish_now()              # evaluate + gate + publish, between two iterations
    loop.rollback("policy-0002")    # serve an earlier version again and train on from it

One iteration: draw prompts (live/file mix), sample one response each from the served policy and
score it (``RolloutCollector``), drop stale or unusable samples, one ``learner.step``. Every
``publish_every`` iterations the candidate is evaluated and, if the gate passes, published and
announced.

Staleness is measured in learner steps (``rollout_ages``): the loop keeps, along its lineage, how
many learner steps led to each version's weights (``LoopState.version_depth``) and to the weights
now (``LoopState.depth``); a rollout from version v is ``depth - version_depth[v]`` steps stale.

A refused trainer finds its way back: after ``revert_after_refusals`` refusals in a row, or at once
when the held-out KL of its own weights to the reference passes the bound, the learner returns to
the weights of the last published version (``_revert``) instead of training further from a refused
candidate. The optimiser is reset (Adam's moments point along the refused direction; kept, they
would push the weights the same way again) and the adaptive KL coefficient is kept (it is the
controller's estimate of how hard this policy must be held back). Checkpoints every ``checkpoint_every`` iterations, after each publish or rollback, and
on stop. A failed iteration (a dependency down, a bad batch) is logged, counted and retried after
``idle_sleep_s``; the thread never dies of it.

``LoopState`` is everything besides the learner that a restart must remember (lineage, reference,
last published version, the gate's baseline); it is JSON and goes into each checkpoint next to the
learner's tensors. The announcement owed is not in it: the policy line keeps it in the model store
(shared/version_line.py).

Crash consistency of a publish: the policy line publishes (atomic; current; announcement owed) ->
checkpoint recording the version in the lineage -> announce. A trainer killed after the checkpoint
announces on its next iteration. One killed before it finds a current version that its checkpoint
does not know (its weights are lost): the version is withdrawn (``policy.current`` back to the
lineage head, nothing announced) and training goes on from the checkpoint; the next publish
supersedes it. A rollback follows the same order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

import grpc

from services.trainer import metrics
from services.trainer.checkpoint import CheckpointStore, LoadedCheckpoint
from services.trainer.guards import Guard, GuardResult, guard_metric_key, run_guards
from services.trainer.learner import LearnerState
from services.trainer.prompts import LivePromptBuffer, PromptMixer
from services.trainer.publishing import (
    Evaluation,
    PolicyGateDecision,
    PolicyPublisher,
    answers_changed,
    mean,
    policy_gate,
    same_figure,
    with_guards,
)
from services.trainer.rollout_collector import CollectResult, RolloutCollector, SampledCompletion
from services.trainer.user_load import STATES, Decision, UserLoad, UserLoadGovernor
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from shared.logging import get_logger, log_event
from shared.model_store import (
    CorruptVersionError,
    InvalidNameError,
    Manifest,
    ModelStoreError,
    UnknownVersionError,
)

log = get_logger(__name__)

LINEAGE_KEPT = 32
"""Versions of the lineage remembered (with publish_every steps between them, far more than any
sensible max_staleness_steps reaches back)."""
SAME_RM_ATTEMPTS = 3
"""Candidate evaluations tried before giving up on scoring it and the baseline with one reward model."""


@dataclass
class LoopState:
    """What a restarted trainer must remember besides the learner (JSON, saved in checkpoints)."""

    lineage: list[str]
    """Versions the weights descend from, oldest first; the last is the one being improved."""
    reference_version: str
    value_rm_version: str
    """The RM version the value model was initialised from."""
    step: int = 0
    """PPO iterations done (across restarts and rollbacks)."""
    last_published: dict | None = None
    """{version, parent, published_at, metrics, reason} of the last publish or rollback."""
    baseline: dict | None = None
    """{reward, rm_version, answers, guards}: the held-out evaluation of the version the weights were
    last published as (or rolled back to), with its guard values ({guard name: value}, filled in as
    guards need them); None until measured."""
    dropped: dict[str, int] = field(default_factory=dict)
    last_gate: dict | None = None
    depth: int = 0
    """Learner steps from the lineage's first version to the learner's weights now (a revert sets it
    back to the head's; a rollback restarts it at 0)."""
    version_depth: dict[str, int] = field(default_factory=dict)
    """Lineage version -> learner steps from the lineage's first version to its weights."""
    refusals_in_a_row: int = 0
    """Candidates refused since the last publish, rollback or revert."""
    reverts: int = 0
    """Times the learner returned to the last published weights."""

    def __post_init__(self) -> None:
        if not self.version_depth:  # a new lineage, or a checkpoint from before depths were kept
            self.version_depth = {v: self.depth for v in self.lineage}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LoopState:
        # Checkpoints written before the policy line kept the owed announcement in the store.
        doc = {k: v for k, v in doc.items() if k != "pending_announcement"}
        return cls(**doc)


@dataclass(frozen=True)
class LoopSettings:
    rollouts_per_iteration: int
    max_staleness_steps: int
    publish_every: int
    checkpoint_every: int
    kl_bound: float
    reward_tolerance: float
    idle_sleep_s: float = 2.0
    reward_z: float = 0.0
    """The reward bound's confidence (publishing.reward_fell); 0: the plain comparison."""
    seed: int = 0
    revert_after_refusals: int = 0
    """0: never revert on refusals (a KL refusal still reverts when this is set, see ``_revert``)."""


@dataclass(frozen=True)
class GateResult:
    """A publish gate decision, a publication or a rollback (the PublishResult of the API)."""

    published: bool
    reason: str
    step: int
    version: str = ""
    parent: str = ""
    published_at: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    heldout_reward: float = 0.0
    kl: float = 0.0
    baseline_reward: float = 0.0
    guards: list[dict[str, Any]] = field(default_factory=list)
    """Each guard's result (guards.GuardResult as a dict) when the guards ran: only for a candidate
    that passed the KL and reward bounds."""
    refused_by: str = ""
    """The check that refused the candidate (PolicyGateDecision.check); empty when published."""
    compared: bool = False
    """The candidate's held-out figure was compared with a baseline's under the same RM."""
    same_as_baseline: bool = False
    """...and it was the same figure (``publishing.same_figure``): the gate could not tell them apart."""


@dataclass(frozen=True)
class StatusSnapshot:
    step: int
    paused: bool
    state: str
    detail: str
    base_policy_version: str
    reference_policy_version: str
    last_published: dict | None
    mean_reward: float
    kl: float
    entropy: float
    rm_version: str
    checkpoint_step: int
    live_prompts: int
    dropped_rollouts: dict[str, int]
    last_gate: GateResult | None
    baseline_reward: float


class _Figures(TypedDict):
    """The last PPO step's figures, for the status."""

    mean_reward: float
    kl: float
    entropy: float
    rm_version: str


def rollout_ages(lineage: Sequence[str], version_depth: dict[str, int], depth: int) -> dict[str, int]:
    """Version -> learner steps since the learner's weights were that version, for the lineage's
    versions whose depth is known:

        age(v) = depth - version_depth[v]

    e.g. a version published 100 learner steps ago and served ever since is 100 steps old, however
    many candidates were refused or queued in between; after a revert to the head, the head is 0."""
    return {v: depth - version_depth[v] for v in lineage if v in version_depth}


def checkpoint_payload(learner: Any, state: LoopState) -> dict[str, Any]:
    ls = learner.state_dict()
    return {"learner": {"tensors": ls.tensors, "meta": ls.meta}, "loop": state.to_json()}


def restore(loaded: LoadedCheckpoint, load_learner: Callable[[str, LoopState], Any]) -> tuple[Any, LoopState]:
    """(learner, state) from a checkpoint: the learner is built from the lineage's newest version
    (for its architecture and tokenizer), then its trained weights and optimisers are loaded."""
    state = LoopState.from_json(loaded.state["loop"])
    learner = load_learner(state.lineage[-1], state)
    learner.load_state_dict(
        LearnerState(tensors=loaded.state["learner"]["tensors"], meta=loaded.state["learner"]["meta"])
    )
    return learner, state


class TrainingLoop:
    def __init__(
        self,
        learner: Any,
        state: LoopState,
        mixer: PromptMixer,
        collector: RolloutCollector,
        publisher: PolicyPublisher,
        checkpoints: CheckpointStore,
        settings: LoopSettings,
        load_learner: Callable[[str, LoopState], Any],
        live: LivePromptBuffer | None = None,
        *,
        paused: bool = False,
        guards: Sequence[Guard] = (),
        governor: UserLoadGovernor | None = None,
        user_load: Callable[[], UserLoad | None] | None = None,
    ):
        self.learner = learner
        self.state = state
        self.mixer = mixer
        self.collector = collector
        self.publisher = publisher
        self.checkpoints = checkpoints
        self.settings = settings
        self.load_learner = load_learner
        self.live = live if live is not None else mixer.live
        self.guards = list(guards)
        """Checks that do not move with the live RM (guards.py), run on a candidate that passed the gate."""
        self.governor = governor if user_load is not None else None
        """Yields rollout sampling to users by the serving load ``user_load`` reads (user_load.py);
        None: samples whatever the load."""
        self.user_load = user_load
        self._stop = threading.Event()
        """The thread's stop event (``run``): ends a wait for users."""
        self._idle_iteration = False
        self._lock = threading.RLock()  # held for any use of the learner or the state
        self._running = threading.Event()
        if not paused:
            self._running.set()
        metrics.PAUSED.set(1 if paused else 0)
        self._phase = "starting"
        self._detail = ""
        self._figures: _Figures = {"mean_reward": 0.0, "kl": 0.0, "entropy": 0.0, "rm_version": ""}
        self._checkpoint_step = max(checkpoints.steps(), default=0)
        self._set_policy_info()

    # --- control ---------------------------------------------------------------------------

    def pause(self) -> None:
        self._running.clear()
        metrics.PAUSED.set(1)
        log_event(log, "training paused", step=self.state.step)

    def resume(self) -> None:
        self._running.set()
        metrics.PAUSED.set(0)
        log_event(log, "training resumed", step=self.state.step)

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def status(self) -> StatusSnapshot:
        s = self.state
        gate_doc = s.last_gate
        return StatusSnapshot(
            step=s.step,
            paused=self.paused,
            state="paused" if self.paused else self._phase,
            detail=self._detail,
            base_policy_version=s.lineage[-1],
            reference_policy_version=s.reference_version,
            last_published=dict(s.last_published) if s.last_published else None,
            mean_reward=self._figures["mean_reward"],
            kl=self._figures["kl"],
            entropy=self._figures["entropy"],
            rm_version=self._figures["rm_version"],
            checkpoint_step=self._checkpoint_step,
            live_prompts=len(self.live),
            dropped_rollouts=dict(s.dropped),
            last_gate=GateResult(**gate_doc) if gate_doc else None,
            baseline_reward=float(s.baseline["reward"]) if s.baseline else 0.0,
        )

    # --- the thread ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Train until ``stop`` is set (the iteration in progress finishes first)."""
        log_event(log, "training loop started", step=self.state.step, base=self.state.lineage[-1], paused=self.paused)
        self._phase = "training"
        self._stop = stop
        while not stop.is_set():
            if not self._running.wait(0.2):
                continue
            started = time.monotonic()
            if self.governor is not None:
                # Outside the lock: Status, PublishNow and Rollback are answered while the trainer yields.
                decision = self._wait_for_users(stop, until_paused=True)
                if decision is None or self.paused:
                    continue
                self._idle_iteration, started = decision.state == "idle", time.monotonic()
            try:
                did_work = self.run_iteration()
                if did_work and self.governor is not None:
                    now = time.monotonic()
                    self.governor.worked(now - started, now, idle=self._idle_iteration)
            except _Stopping:
                break
            except Exception as exc:
                kind = type(exc).__name__
                metrics.ITERATION_FAILURES.labels(kind).inc()
                self._phase, self._detail = "waiting", f"{kind}: {exc}"
                log.warning(
                    "iteration failed; retrying in %.1f s: %s: %s",
                    self.settings.idle_sleep_s,
                    kind,
                    exc,
                    exc_info=not _is_expected(exc),
                )
                did_work = False
            if not did_work:
                stop.wait(self.settings.idle_sleep_s)

    def run_iteration(self) -> bool:
        """One iteration; False when nothing could be trained on (no prompts, every sample dropped)."""
        with self._lock:
            self._send_pending_announcement()
            if self.state.baseline is None:
                self._phase, self._detail = "evaluating", "measuring the baseline held-out reward"
                self._measure_baseline()
            self._phase, self._detail = "training", ""
            started = time.monotonic()
            prompts, n_live = self.mixer.sample(self.settings.rollouts_per_iteration)
            if not prompts:
                self._phase, self._detail = "waiting", "no prompts yet (live only, none received)"
                return False
            ages = rollout_ages(self.state.lineage, self.state.version_depth, self.state.depth)
            result = self._collect(prompts, ages, seed=self.settings.seed * 100_003 + self.state.step * 997)
            sampled_at = time.monotonic()
            metrics.ROLLOUTS_PER_SECOND.set(result.sampled / max(sampled_at - started, 1e-9))
            metrics.ITERATION_SECONDS.labels("rollouts").observe(sampled_at - started)
            for reason, count in result.dropped.items():
                self.state.dropped[reason] = self.state.dropped.get(reason, 0) + count
                metrics.ROLLOUTS_DROPPED.labels(reason).inc(count)
            if not result.rollouts:
                self._phase = "waiting"
                self._detail = f"every sampled rollout was dropped: {dict(result.dropped)}"
                log_event(log, "no usable rollouts", level=30, dropped=dict(result.dropped))
                return False
            self._hold_for_users("learner step")
            step_started = time.monotonic()
            stats = self.learner.step(result.rollouts)
            metrics.ITERATION_SECONDS.labels("ppo_step").observe(time.monotonic() - step_started)
            oldest = max(ages.get(r.policy_version, 0) for r in result.rollouts)
            self.state.step += 1
            self.state.depth += 1
            self._figures = {
                "mean_reward": stats.mean_score,
                "kl": stats.mean_kl,
                "entropy": stats.entropy,
                "rm_version": result.rm_version,
            }
            metrics.ITERATIONS.inc()
            metrics.ROLLOUTS.inc(len(result.rollouts))
            metrics.STEP.set(self.state.step)
            metrics.MEAN_REWARD.set(stats.mean_score)
            metrics.KL.set(stats.mean_kl)
            metrics.BEHAVIOUR_KL.set(stats.behaviour_kl)
            metrics.OLDEST_ROLLOUT_STEPS.set(oldest)
            metrics.ENTROPY.set(stats.entropy)
            metrics.LIVE_PROMPTS_BUFFERED.set(len(self.live))
            log_event(
                log,
                "iteration",
                step=self.state.step,
                rollouts=len(result.rollouts),
                live=n_live,
                dropped=sum(result.dropped.values()),
                reward=round(stats.mean_score, 4),
                kl=round(stats.mean_kl, 4),
                behaviour_kl=round(stats.behaviour_kl, 4),
                oldest_rollout_steps=oldest,
                entropy=round(stats.entropy, 4),
                seconds=round(time.monotonic() - started, 2),
            )
            published = False
            if self.settings.publish_every and self.state.step % self.settings.publish_every == 0:
                published = self._evaluate_and_publish().published  # checkpoints when it publishes
            if not published and self.state.step % self.settings.checkpoint_every == 0:
                self.checkpoint()
            return True

    # --- publish, rollback, checkpoint -------------------------------------------------------

    def publish_now(self) -> GateResult:
        """Evaluate the candidate and publish it if it passes the gate (waits for the iteration in progress)."""
        with self._lock:
            try:
                if self.state.baseline is None:
                    self._measure_baseline()
                if not self.learner.updated_since_publish:
                    return GateResult(
                        published=False,
                        step=self.state.step,
                        reason=f"no update since {self.state.lineage[-1]}: nothing to publish",
                    )
                return self._evaluate_and_publish()
            except grpc.RpcError as exc:
                raise Unavailable(f"reward service: {exc.code().name}: {exc.details()}") from exc

    def rollback(self, version: str) -> GateResult:
        """Serve ``version`` again and continue training from its weights (a fresh optimiser)."""
        with self._lock:
            try:
                manifest = self.publisher.rollback(version)  # verifies the files against the manifest
            except InvalidNameError as exc:
                raise InvalidArgument(str(exc), param="policy_version") from exc
            except UnknownVersionError as exc:
                raise NotFound(str(exc), param="policy_version") from exc
            except (CorruptVersionError, ModelStoreError) as exc:
                raise FailedPrecondition(f"cannot roll back: {exc}", param="policy_version") from exc
            self.learner = self.load_learner(version, self.state)
            self.state.lineage = [version]
            self.state.depth, self.state.version_depth, self.state.refusals_in_a_row = 0, {version: 0}, 0
            self.state.baseline = None  # measured again, on the rolled-back weights, before the next step
            self.state.last_published = {
                "version": version,
                "parent": manifest.parent or "",
                "published_at": manifest.created_at,
                "metrics": dict(manifest.metrics),
                "reason": "rollback",
            }
            result = GateResult(
                published=True,
                reason=f"rolled back to {version}",
                step=self.state.step,
                version=version,
                parent=manifest.parent or "",
                published_at=manifest.created_at,
                metrics=dict(manifest.metrics),
            )
            self.state.last_gate = asdict(result)
            metrics.ROLLBACKS.inc()
            self._set_policy_info()
            self.checkpoint()
            self._send_pending_announcement()
            log_event(log, "rolled back", version=version, step=self.state.step)
            return result

    def checkpoint(self) -> None:
        with self._lock:
            self.checkpoints.save(self.state.step, checkpoint_payload(self.learner, self.state))
            self._checkpoint_step = self.state.step
            metrics.CHECKPOINTS.inc()
            log_event(log, "checkpoint saved", step=self.state.step)

    def checkpoint_if_changed(self) -> None:
        """On shutdown: save unless the newest checkpoint already holds this step."""
        with self._lock:
            if self._checkpoint_step != self.state.step or not self.checkpoints.steps():
                self.checkpoint()

    # --- internals -------------------------------------------------------------------------

    def _measure_baseline(self) -> None:
        """Evaluate the weights as published (no step since): the bar for the next candidate."""
        ev = self.publisher.evaluate(self.learner)
        self.state.baseline = {
            "reward": ev.heldout_reward,
            "rm_version": ev.rm_version,
            "answers": ev.answers,
            "scores": ev.scores,
        }
        log_event(
            log,
            "baseline measured",
            version=self.state.lineage[-1],
            heldout_reward=round(ev.heldout_reward, 4),
            rm_version=ev.rm_version,
        )

    def _baseline_reward(self, rm_version: str) -> float | None:
        b = self.state.baseline
        if b is None:
            return None
        if b["rm_version"] != rm_version:
            # Scores of different reward models are not comparable: re-score the baseline's answers.
            scores, scored_by = self.publisher.rescore(b["answers"])
            reward = mean(scores)
            b = self.state.baseline = {**b, "reward": reward, "rm_version": scored_by, "scores": scores}
            log_event(log, "baseline re-scored", rm_version=scored_by, heldout_reward=round(reward, 4))
        return float(b["reward"])

    def _evaluate_and_publish(self) -> GateResult:
        """Evaluate the candidate (the learner's weights, or their moving average when averaging is
        on: ``learner.candidate_weights``), run the guards, and publish it if the gate passes."""
        self._phase, self._detail = "evaluating", "held-out evaluation of the candidate"
        with self.learner.candidate_weights():
            ev, baseline, decision = self._evaluate_under_one_rm()
            metrics.HELDOUT_REWARD.set(ev.heldout_reward)
            metrics.HELDOUT_KL.set(ev.kl)
            compared, same = self._count_discrimination(ev, baseline)
            guard_results: list[GuardResult] = []
            if decision.ok and self.guards:
                self._detail = "guards"
                guard_results = self._run_guards(ev)
                decision = with_guards(decision, guard_results)
            if decision.ok:
                manifest = self._publish_candidate(ev, baseline, guard_results)
        common: dict[str, Any] = {
            "step": self.state.step,
            "heldout_reward": ev.heldout_reward,
            "kl": ev.kl,
            "baseline_reward": baseline if baseline is not None else 0.0,
            "guards": [r.to_json() for r in guard_results],
            "compared": compared,
            "same_as_baseline": same,
        }
        if not decision.ok:
            result = GateResult(published=False, reason=decision.reason, refused_by=decision.check, **common)
            self.state.last_gate = asdict(result)
            self.state.refusals_in_a_row += 1
            metrics.GATE_REFUSED.labels(decision.check or "other").inc()
            log_event(
                log,
                "candidate refused",
                level=30,
                reason=decision.reason,
                check=decision.check,
                step=self.state.step,
                in_a_row=self.state.refusals_in_a_row,
            )
            self._maybe_revert(decision.check)
            self._phase, self._detail = "training", ""
            return result
        parent = self.state.lineage[-1]
        self.learner.mark_published(manifest.version)
        self.state.lineage = (self.state.lineage + [manifest.version])[-LINEAGE_KEPT:]
        depths = {**self.state.version_depth, manifest.version: self.state.depth}
        self.state.version_depth = {v: depths[v] for v in self.state.lineage if v in depths}
        self.state.refusals_in_a_row = 0
        self.state.baseline = {
            "reward": ev.heldout_reward,
            "rm_version": ev.rm_version,
            "answers": ev.answers,
            "scores": ev.scores,
            "guards": {r.name: r.value for r in guard_results},
        }
        self.state.last_published = {
            "version": manifest.version,
            "parent": parent,
            "published_at": manifest.created_at,
            "metrics": dict(manifest.metrics),
            "reason": "candidate" if self.publisher.rollout else "publish",
        }
        result = GateResult(
            published=True,
            reason=decision.reason,
            version=manifest.version,
            parent=parent,
            published_at=manifest.created_at,
            metrics=dict(manifest.metrics),
            **common,
        )
        self.state.last_gate = asdict(result)
        metrics.PUBLISHED.inc()
        self._set_policy_info()
        self.checkpoint()  # the lineage holds the version before it is announced
        self._send_pending_announcement()
        self._phase, self._detail = "training", ""
        return result

    def _publish_candidate(self, ev: Evaluation, baseline: float | None, guard_results: list[GuardResult]) -> Manifest:
        """Write the candidate the gate passed as the next version (inside ``candidate_weights``)."""
        return self.publisher.publish(
            self.learner,
            parent=self.state.lineage[-1],
            evaluation=ev,
            baseline_reward=baseline,
            extra={
                "reference_version": self.state.reference_version,
                "trainer_step": self.state.step,
                "value_rm_version": self.state.value_rm_version,
            },
            metrics={
                "trainer_step": float(self.state.step),
                "train_mean_reward": self._figures["mean_reward"],
                "train_kl": self._figures["kl"],
                "heldout_samples": float(ev.samples),
                **{guard_metric_key(r.name): r.value for r in guard_results},
            },
        )

    def _evaluate_under_one_rm(self) -> tuple[Evaluation, float | None, PolicyGateDecision]:
        """The candidate's evaluation, the baseline's held-out reward and the gate's decision, with
        candidate and baseline scored by the same reward model.

        The RM can be replaced between the candidate's scoring and the baseline's re-scoring (the
        retraining loop publishes every few seconds in a busy loop): then evaluate again, a bounded
        number of times."""
        for _ in range(SAME_RM_ATTEMPTS):
            ev = self.publisher.evaluate(self.learner)
            baseline = self._baseline_reward(ev.rm_version)
            if baseline is None or (
                self.state.baseline is not None and self.state.baseline["rm_version"] == ev.rm_version
            ):
                scores = self.state.baseline.get("scores") if self.state.baseline else None
                decision = policy_gate(
                    ev,
                    baseline,
                    self.settings.kl_bound,
                    self.settings.reward_tolerance,
                    scores,
                    self.settings.reward_z,
                    len(self.publisher.heldout),
                )
                return ev, baseline, decision
        refused = PolicyGateDecision(
            False,
            f"the reward model changed during each of {SAME_RM_ATTEMPTS} evaluations "
            "(candidate and baseline never scored by the same version)",
            "rm_changed",
        )
        return ev, baseline, refused

    def _maybe_revert(self, check: str) -> None:
        """After a refusal: back to the last published weights when ``revert_after_refusals``
        candidates in a row were refused, or at once when the refusal was the learner's own KL to
        the reference passing the bound (training further from there only drifts further)."""
        k = self.settings.revert_after_refusals
        if k <= 0:
            return
        if check == "kl":
            self._revert("kl_bound")
        elif self.state.refusals_in_a_row >= k:
            self._revert("refusals")

    def _revert(self, reason: str) -> None:
        """The learner returns to the weights of the lineage's head (the last published version or
        the one rolled back to) with a fresh optimiser and the KL coefficient it had; the baseline
        (the head's evaluation) stays the bar. Checkpointed."""
        head = self.state.lineage[-1]
        kl_coef = self.learner.kl_controller.value
        refusals = self.state.refusals_in_a_row
        self.learner = self.load_learner(head, self.state)
        self.learner.kl_controller.value = kl_coef
        self.state.depth = self.state.version_depth.get(head, self.state.depth)
        self.state.refusals_in_a_row = 0
        self.state.reverts += 1
        metrics.REVERTS.labels(reason).inc()
        log_event(
            log,
            "reverted to the last published weights",
            level=30,
            version=head,
            reason=reason,
            refusals=refusals,
            step=self.state.step,
            kl_coef=round(kl_coef, 5),
        )
        self.checkpoint()

    def _run_guards(self, ev: Evaluation) -> list[GuardResult]:
        """Every guard on the candidate's answers against the baseline's (whose values are kept in
        the baseline, computed once from its answers when missing)."""
        b = self.state.baseline
        results, known = run_guards(
            self.guards,
            self.publisher.heldout,
            ev.answers,
            b["answers"] if b else None,
            dict(b.get("guards") or {}) if b else {},
        )
        if b is not None:
            b["guards"] = known
        for r in results:
            metrics.GUARD_VALUE.labels(r.name).set(r.value)
            log_event(
                log,
                "guard",
                level=20 if r.ok else 30,
                guard=r.name,
                ok=r.ok,
                value=round(r.value, 4),
                baseline=None if r.baseline is None else round(r.baseline, 4),
                reason=r.reason,
                step=self.state.step,
            )
        return results

    def _count_discrimination(self, ev: Evaluation, baseline: float | None) -> tuple[bool, bool]:
        """Count a candidate compared with a baseline under one RM, and whether its held-out figure
        (and answers) differed from the baseline's: a gate that sees no difference cannot
        discriminate. (compared, same figure)."""
        b = self.state.baseline
        if baseline is None or b is None or b.get("rm_version") != ev.rm_version:
            return False, False
        same = same_figure(ev.heldout_reward, baseline)
        changed = answers_changed(ev.answers, b.get("answers") or [])
        metrics.GATE_COMPARED.inc()
        if same:
            metrics.GATE_SAME_AS_BASELINE.inc()
        log_event(
            log,
            "candidate compared with the baseline",
            step=self.state.step,
            heldout_reward=round(ev.heldout_reward, 4),
            baseline_reward=round(baseline, 4),
            same_figure=same,
            answers_changed=changed,
            answers=len(ev.answers),
        )
        return True, same

    def _send_pending_announcement(self) -> None:
        """Announce what the policy line owes (a publish or rollback Kafka has not acknowledged);
        while Kafka is down it stays owed and is retried next iteration (the version is already
        current in the store, so training need not wait). A current version the lineage does not
        know was published by a run that stopped before its checkpoint recorded it: withdrawn."""
        pending = self.publisher.pending_announcement()
        if pending is None:
            return
        if pending.version not in self.state.lineage:
            log_event(
                log,
                "withdrawing a version the checkpoint does not know (the trainer stopped between publishing "
                "and checkpointing it); serving stays on the lineage head",
                level=30,
                version=pending.version,
                lineage_head=self.state.lineage[-1],
            )
            self.publisher.rollback(self.state.lineage[-1])
            if self.publisher.pending_announcement() is None:
                return
        if self.publisher.announce_pending() is None:
            metrics.ITERATION_FAILURES.labels("announce").inc()

    def _collect(self, prompts: Sequence[Any], ages: dict[str, int], seed: int) -> CollectResult:
        """The iteration's rollouts; with a governor, sent in groups as the serving load allows (prompt
        i keeps seed + i whatever the groups), waiting while users need the capacity, then scored
        together."""
        if self.governor is None:
            return self.collector.collect(prompts, ages, self.settings.max_staleness_steps, seed=seed)
        samples: list[SampledCompletion] = []
        while len(samples) < len(prompts):
            decision = self._wait_for_users(self._stop, until_paused=False)
            if decision is None:
                raise _Stopping()
            self._phase, self._detail = "training", decision.reason if decision.state == "slowed" else ""
            group = prompts[len(samples) : len(samples) + decision.concurrency]
            samples += self.collector.sample(
                group,
                seed + len(samples),
                # users first: a group still out when their pressure reaches the threshold is cancelled
                interrupt=self._users_need_capacity,
                poll_s=self.governor.settings.poll_s,
            )
        self._hold_for_users("scoring")
        return self.collector.finish(samples, ages, self.settings.max_staleness_steps)

    def _hold_for_users(self, what: str) -> None:
        """Users first for the iteration's own CPU work too: while the governor says the trainer
        yields (users' pressure at the threshold, with its hysteresis), the scoring and the learner
        step of rollouts already sampled wait; neither can be cancelled half-way, and on a machine
        that also serves, a PPO step takes the cores from the people chatting for seconds. Only
        yielding holds: the idle budget paces whole iterations, not their second half."""
        if self.governor is None:
            return
        assert self.user_load is not None
        held_from: float | None = None
        while not self._stop.is_set():
            decision = self.governor.decide(self.user_load(), time.monotonic())
            if decision.state != "yielding":
                if held_from is not None:
                    log_event(log, "hold ends", before=what, held_s=round(time.monotonic() - held_from, 2))
                    self._phase, self._detail = "training", ""
                return
            if held_from is None:
                held_from = time.monotonic()
                log_event(log, "holding for users", before=what, reason=decision.reason, step=self.state.step)
                _show_user_load_state("yielding")
            self._phase, self._detail = decision.state, f"{what} held: {decision.reason}"
            t0 = time.monotonic()
            self._stop.wait(decision.wait_s)
            metrics.USER_WAIT_SECONDS.labels("users").inc(time.monotonic() - t0)
        raise _Stopping()

    def _users_need_capacity(self) -> bool:
        """Asked while a group of rollouts is out: users' pressure reached the yield threshold."""
        assert self.governor is not None and self.user_load is not None
        return self.governor.interrupts(self.user_load())

    def _wait_for_users(self, stop: threading.Event, *, until_paused: bool) -> Decision | None:
        """Ask the governor until it lets rollouts go (the decision), waiting as it says meanwhile
        (phase "yielding" or "idle", the reason in the detail); None when ``stop`` is set (or, with
        ``until_paused``, training was paused) first."""
        assert self.governor is not None and self.user_load is not None
        waited_from: float | None = None
        while not stop.is_set() and not (until_paused and self.paused):
            decision = self.governor.decide(self.user_load(), time.monotonic())
            _show_user_load_state(decision.state)
            if decision.concurrency > 0:
                metrics.ROLLOUT_CONCURRENCY.set(decision.concurrency)
                if waited_from is not None:
                    log_event(
                        log,
                        "rollouts resume",
                        state=decision.state,
                        waited_s=round(time.monotonic() - waited_from, 2),
                        step=self.state.step,
                    )
                return decision
            if waited_from is None:
                waited_from = time.monotonic()
                log_event(log, "rollouts wait", state=decision.state, reason=decision.reason, step=self.state.step)
            self._phase, self._detail = decision.state, decision.reason
            t0 = time.monotonic()
            stop.wait(decision.wait_s)
            reason = "users" if decision.state == "yielding" else "idle_budget"
            metrics.USER_WAIT_SECONDS.labels(reason).inc(time.monotonic() - t0)
        return None

    def _set_policy_info(self) -> None:
        metrics.POLICY_INFO.clear()
        metrics.POLICY_INFO.labels(self.state.lineage[-1]).set(1)


class _Stopping(Exception):
    """The thread was stopped while an iteration waited for users: the iteration is dropped."""


def _show_user_load_state(current: str) -> None:
    """rlhf_trainer_user_load_state: 1 for ``current``, 0 for the other states."""
    for state in STATES:
        metrics.USER_LOAD_STATE.labels(state).set(1 if state == current else 0)


def _is_expected(exc: Exception) -> bool:
    """Errors of dependencies (no traceback needed in the log)."""
    return isinstance(exc, (grpc.RpcError, ConnectionError, TimeoutError))
