"""The rollout service's work, behind one lock: candidates in, evidence in, the gate's tick,
operator commands, and the status. No network of its own: the app injects Kafka (``publish``, the
feeds) and the model store (``pointers``, ``CandidateCheck``).

    serving = RolloutServing(state, settings, canary_share=0.1, pointers=..., publish=..., history=events)
    serving.restore()                          # the pointers as the steps on rlhf.rollout left them
    serving.offer_candidate(event)             # a PolicyCandidateEvent (authenticated by CandidateCheck)
    serving.on_evidence(envelope)              # rlhf.feedback / rlhf.completions
    serving.tick()                             # the live gate, about once a second
    serving.promote("policy-0008")             # operators: promote, rollback, pause, resume, set_mode
    serving.status()

**Which candidates start a canary.** Only a version newer than every version the rollout has seen
(in any step, or as a candidate): a replayed or re-announced candidate, the trainer pointing its
candidate back (a "rollback" of the candidate pointer: the trainer rebased, nothing new to try) and
a version already rolled back never start one again. A candidate must be announced by a trusted key
(the trainer's) and be signed itself, with the announced manifest (``CandidateCheck``).

**Evidence.** Ratings and completions count only while a canary runs and only if produced since it
started (envelope ``produced_at``): exactly what a restarted service reads back from Kafka, so that
the same evidence gives the same decision.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from services.rollout import metrics
from services.rollout.controller import PolicyPointers, RolloutController
from services.rollout.domain import SignalsView, StatusView, VerdictView
from services.rollout.evidence import EvidenceBook, GateSettings, VersionEvidence
from services.rollout.lifecycle import Lifecycle, RolloutState
from shared.errors import InvalidArgument
from shared.events import CompletionEvent, FeedbackEvent, RolloutEvent
from shared.kafka.envelope import Envelope
from shared.logging import get_logger, log_event
from shared.model_store import InvalidNameError, ModelStoreError, version_number
from shared.version_line import VersionLine, VersionRefused

log = get_logger(__name__)

SIGNALS = ("thumbs_up_rate", "likert_mean", "error_rate", "latency_p50_s", "mean_tokens")
COUNTS = ("thumbs", "likerts", "completions")


def newest_version(events: list[RolloutEvent], stable: str) -> int:
    """The highest version number the steps mention (as the step's version, stable, canary or
    queued), or the stable version's: a candidate must be above it to be new."""
    numbers = [version_number(stable)] if stable else [0]
    for ev in events:
        for v in (ev.version, ev.stable, ev.canary, ev.queued):
            try:
                numbers.append(version_number(v))
            except InvalidNameError:
                continue
    return max(numbers)


def check_version_name(version: str) -> str:
    """``version`` when it names a policy version; InvalidArgument (param version) otherwise."""
    try:
        if not version.startswith("policy-"):
            raise InvalidNameError(f"{version!r} is not a policy version")
        version_number(version)
    except InvalidNameError as exc:
        raise InvalidArgument(f"version: {exc}", param="version") from None
    return version


class CandidateCheck:
    """Authenticates a candidate announcement and the version it names (the candidate pointer's
    line with the trainer's verify keys); returns (version, evidence) or raises VersionRefused."""

    def __init__(self, line: VersionLine):
        self.line = line

    def __call__(self, event: Any) -> tuple[str, dict[str, Any]]:
        announcement = self.line.read_announcement(event)  # wrong_event, wrong_line, bad_signature
        if announcement.reason != "publish":
            raise VersionRefused(
                "rollback", f"{announcement.version}: the trainer pointed its candidate back (nothing new)"
            )
        stored = self.line.read_signed(announcement.version)  # bad_signature
        if stored.sha256 != announcement.manifest_sha256:
            raise VersionRefused("manifest_mismatch", f"{announcement.version}: its manifest is not the announced one")
        manifest = stored.manifest
        evidence = {
            "candidate": {
                "parent": manifest.parent or "",
                "metrics": dict(manifest.metrics),
                "announcement_sequence": announcement.sequence,
            }
        }
        return announcement.version, evidence

    def recorded(self) -> Any | None:
        """The candidate pointer's last announcement as the store records it (authenticated), as an
        event to offer like one read from Kafka; None when the trainer never announced one."""
        record = self.line.trusted_record(required=False)
        if record is None:
            return None
        manifest = self.line.store.manifest(record.version)
        return self.line.kind.make_event(record, manifest.parent, dict(manifest.metrics))


class RolloutServing:
    def __init__(
        self,
        state: RolloutState,
        settings: GateSettings,
        *,
        canary_share: float,
        pointers: PolicyPointers,
        publish: Callable[[RolloutEvent], None],
        check: Callable[[Any], tuple[str, dict[str, Any]]] | None = None,
        history: list[RolloutEvent] | None = None,
        max_votes: int = 200_000,
        recent_steps: int = 50,
        clock: Callable[[], float] = time.time,
        announce_owed: Callable[[], bool] | None = None,
    ):
        history = history or []
        self._lock = threading.RLock()
        self._publish = publish
        self.check = check
        self.announce_owed = announce_owed
        self.recent: collections.deque[RolloutEvent] = collections.deque(history[-recent_steps:], maxlen=recent_steps)
        self.newest = newest_version(history, state.stable)
        self.latest_candidate = ""
        self.last_verdict: VerdictView | None = None
        self.controller = RolloutController(
            Lifecycle(state, canary_share),
            EvidenceBook(max_votes=max_votes),
            settings,
            pointers,
            self._emit,
            clock,
        )
        self._show()

    @property
    def state(self) -> RolloutState:
        return self.controller.state

    # --- start -------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Move the pointers where the steps left them (idempotent), announce what is owed."""
        with self._lock:
            self.controller.restore()
            self._announce_owed()
            log_event(
                log,
                "rollout state restored",
                sequence=self.state.sequence,
                stable=self.state.stable,
                canary=self.state.canary or "-",
                queued=self.state.queued or "-",
                paused=self.state.paused,
                mode=self.state.mode,
            )

    # --- inputs ------------------------------------------------------------------------------------

    def offer_candidate(self, event: Any) -> list[RolloutEvent]:
        """A candidate announcement: a canary (or the queue) when it is authentic and new."""
        version = str(getattr(event, "version", ""))
        try:
            if self.check is None:
                raise VersionRefused("no_check", "no candidate check configured")
            version, evidence = self.check(event)
        except VersionRefused as exc:
            return self._ignore(version, exc.reason, str(exc))
        except (ModelStoreError, ValueError, OSError) as exc:
            return self._ignore(version, type(exc).__name__, str(exc))
        with self._lock:
            if version_number(version) <= self.newest:
                return self._ignore(version, "not_newer", f"not newer than policy-{self.newest:04d}", level=20)
            self.newest = version_number(version)
            self.latest_candidate = version
            metrics.CANDIDATES.inc()
            log_event(log, "candidate", version=version)
            return self.controller.on_candidate(version, evidence)

    def _ignore(self, version: str, reason: str, why: str, level: int = 30) -> list[RolloutEvent]:
        metrics.CANDIDATES_IGNORED.labels(reason).inc()
        log_event(log, "candidate not taken", level=level, version=version, reason=reason, detail=why)
        return []

    def on_evidence(self, env: Envelope) -> None:
        """A record of rlhf.feedback or rlhf.completions."""
        payload = env.payload
        if isinstance(payload, FeedbackEvent):
            topic = "feedback"
        elif isinstance(payload, CompletionEvent):
            topic = "completions"
        else:
            return
        metrics.EVIDENCE_EVENTS.labels(topic).inc()
        with self._lock:
            s = self.state
            if not s.canary or env.produced_at < s.canary_since:
                return
            if topic == "feedback":
                self.controller.on_feedback(payload)
            else:
                self.controller.on_completion(payload)

    def tick(self) -> list[RolloutEvent]:
        """The live gate on the canary (acted on unless paused or manual); pointer announcements
        still owed are retried."""
        with self._lock:
            events = self.controller.tick()
            decision = self.controller.last_decision
            if (self.state.canary or events) and decision is not None:
                self.last_verdict = VerdictView(decision.action, decision.reason, decision.evidence, time.time())
                if decision.action != "continue":
                    metrics.VERDICTS.labels(decision.action).inc()
                _show_intervals(decision.evidence)
            for ev in events:
                if ev.stage in ("promoted", "rolled_back"):
                    metrics.DECISIONS.labels("promote" if ev.stage == "promoted" else "rollback", "gate").inc()
            self._announce_owed()
            self._show()
            return events

    # --- operator commands -------------------------------------------------------------------------

    def promote(self, version: str) -> list[RolloutEvent]:
        with self._lock:
            events = self.controller.promote(check_version_name(version))
            metrics.DECISIONS.labels("promote", "operator").inc()
            return self._after_command(events)

    def rollback(self, version: str) -> list[RolloutEvent]:
        with self._lock:
            events = self.controller.rollback(check_version_name(version))
            metrics.DECISIONS.labels("rollback", "operator").inc()
            return self._after_command(events)

    def pause(self) -> list[RolloutEvent]:
        with self._lock:
            return self._after_command(self.controller.pause())

    def resume(self) -> list[RolloutEvent]:
        with self._lock:
            return self._after_command(self.controller.resume())

    def set_mode(self, mode: str) -> list[RolloutEvent]:
        with self._lock:
            return self._after_command(self.controller.set_mode(mode))

    def _after_command(self, events: list[RolloutEvent]) -> list[RolloutEvent]:
        self._announce_owed()
        self._show()
        return events

    # --- status ------------------------------------------------------------------------------------

    def status(self) -> StatusView:
        with self._lock:
            s = self.state
            book = self.controller.book
            stable = book.of(s.stable) if s.canary else VersionEvidence()
            return StatusView(
                stable=s.stable,
                canary=s.canary,
                canary_share=s.canary_share,
                canary_since=s.canary_since if s.canary else 0.0,
                queued=s.queued,
                paused=s.paused,
                mode=s.mode,
                sequence=s.sequence,
                last_verdict=self.last_verdict if s.canary else None,
                stable_signals=SignalsView(s.stable, stable.summary()),
                canary_signals=SignalsView(s.canary, book.of(s.canary).summary()) if s.canary else None,
                recent=list(self.recent),
                latest_candidate=self.latest_candidate,
            )

    # --- internals ---------------------------------------------------------------------------------

    def _emit(self, ev: RolloutEvent) -> None:
        """Durable first (``publish`` returns once Kafka acknowledged the step), then remembered."""
        self._publish(ev)
        self.recent.append(ev)
        metrics.TRANSITIONS.labels(ev.stage).inc()
        if ev.stage == "canary":
            self.last_verdict = None

    def _announce_owed(self) -> None:
        if self.announce_owed is not None:
            metrics.POINTERS_OWED.set(0 if self.announce_owed() else 1)

    def _show(self) -> None:
        s = self.state
        metrics.CANARY_SHARE.set(s.canary_share if s.canary else 0.0)
        metrics.CANARY_AGE.set(max(0.0, time.time() - s.canary_since) if s.canary else 0.0)
        metrics.PAUSED.set(1 if s.paused else 0)
        metrics.MANUAL.set(1 if s.mode == "manual" else 0)
        metrics.QUEUED.set(1 if s.queued else 0)
        metrics.SEQUENCE.set(s.sequence)
        metrics.VERSION_INFO.clear()
        metrics.VERSION_INFO.labels("stable", s.stable).set(1)
        if s.canary:
            metrics.VERSION_INFO.labels("canary", s.canary).set(1)
        book = self.controller.book
        metrics.VOTES_HELD.set(book.votes_held)
        metrics.VOTES_FORGOTTEN.set(book.forgotten_votes)
        for role, version in (("stable", s.stable), ("canary", s.canary)):
            summary = book.of(version).summary() if s.canary and version else VersionEvidence().summary()
            for signal in SIGNALS:
                value = summary.get(signal)
                metrics.SIGNAL_MEAN.labels(role, signal).set(math.nan if value is None else float(value))
            for signal in COUNTS:
                metrics.SIGNAL_COUNT.labels(role, signal).set(summary.get(signal) or 0)


def _show_intervals(evidence: dict[str, Any]) -> None:
    for signal, doc in evidence.items():
        if isinstance(doc, dict) and "difference" in doc:
            low, high = doc["difference"]
            metrics.INTERVAL.labels(signal, "low").set(low)
            metrics.INTERVAL.labels(signal, "high").set(high)
