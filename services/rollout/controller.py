"""The rollout controller: candidates, live evidence and operator commands in; rollout events and
pointer moves out. No network here: the app wires Kafka and the model store to it.

    controller = RolloutController(lifecycle, EvidenceBook(), GateSettings(), pointers, emit, clock)
    controller.restore()                  # after a restart: make the pointers match the state
    controller.on_candidate("policy-0008")
    controller.on_feedback(event); controller.on_completion(event)
    controller.tick()                     # about once a second: the live gate on the canary

Every step is first made durable (``emit`` returns once Kafka acknowledged the RolloutEvent), then
acted on (``pointers``: which version the canary group and the stable group serve). A controller
killed between the two finds the decision on the topic when it restarts, and ``restore`` moves the
pointers to match; moving a pointer to where it already is changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from services.rollout.evidence import EvidenceBook, GateDecision, GateSettings, decide
from services.rollout.lifecycle import Lifecycle, RolloutState
from shared.events import CompletionEvent, FeedbackEvent, RolloutEvent
from shared.logging import get_logger, log_event

log = get_logger(__name__)


class PolicyPointers(Protocol):
    """Where each group of inference replicas takes its version from."""

    def serve_canary(self, version: str) -> None:
        """The canary group serves ``version`` (the stable version when no canary runs)."""

    def serve_stable(self, version: str) -> None:
        """Every other replica serves ``version`` (a promotion)."""


class RolloutController:
    def __init__(
        self,
        lifecycle: Lifecycle,
        book: EvidenceBook,
        settings: GateSettings,
        pointers: PolicyPointers,
        emit: Callable[[RolloutEvent], None],
        clock: Callable[[], float] = time.time,
    ):
        self.lifecycle = lifecycle
        self.book = book
        self.settings = settings
        self.pointers = pointers
        self.emit = emit
        self.clock = clock
        self.last_decision: GateDecision | None = None
        self.book.watch(self._watched())

    @property
    def state(self) -> RolloutState:
        return self.lifecycle.state

    def restore(self) -> None:
        """Make the pointers match the state the topic left (idempotent)."""
        s = self.state
        self.pointers.serve_stable(s.stable)
        self.pointers.serve_canary(s.canary or s.stable)
        self.book.watch(self._watched())

    # --- inputs --------------------------------------------------------------------------------------

    def on_candidate(self, version: str, evidence: dict[str, Any] | None = None) -> list[RolloutEvent]:
        """A version the trainer published as its candidate; ``evidence``: what it was gated on
        (recorded in the step that queues it or starts its canary)."""
        return self._apply(self.lifecycle.candidate(version, self.clock(), evidence))

    def on_feedback(self, ev: FeedbackEvent) -> None:
        self.book.observe_feedback(ev)

    def on_completion(self, ev: CompletionEvent) -> None:
        self.book.observe_completion(ev)

    def tick(self) -> list[RolloutEvent]:
        """Run the live gate on the canary, if one runs, and act on its decision."""
        s = self.state
        if not s.canary:
            return []
        decision = decide(
            self.book.of(s.canary),
            self.book.of(s.stable),
            self.book.side_by_side(s.canary, s.stable),
            self.settings,
            age_s=self.clock() - s.canary_since,
        )
        self.last_decision = decision
        return self._apply(self.lifecycle.decide(decision.action, decision.reason, decision.evidence, self.clock()))

    # --- operator commands ----------------------------------------------------------------------------

    def promote(self, version: str) -> list[RolloutEvent]:
        return self._apply(self.lifecycle.promote(version, self.clock()))

    def rollback(self, version: str) -> list[RolloutEvent]:
        return self._apply(self.lifecycle.rollback(version, self.clock()))

    def pause(self) -> list[RolloutEvent]:
        return self._apply(self.lifecycle.pause(self.clock()))

    def resume(self) -> list[RolloutEvent]:
        return self._apply(self.lifecycle.resume(self.clock()))

    def set_mode(self, mode: str) -> list[RolloutEvent]:
        return self._apply(self.lifecycle.set_mode(mode, self.clock()))

    # --- acting ---------------------------------------------------------------------------------------

    def _apply(self, events: list[RolloutEvent]) -> list[RolloutEvent]:
        for ev in events:
            self.emit(ev)  # durable first: a crash after this line is repaired by restore()
            if ev.stage == "canary":
                # A new canary period: both arms are judged on what users said from now on (what a
                # restarted controller reads back from Kafka since the canary's start).
                self.book.reset()
            if ev.stage == "promoted":
                self.pointers.serve_stable(ev.stable)
            if ev.stage in ("canary", "promoted", "rolled_back"):
                self.pointers.serve_canary(ev.canary or ev.stable)
            log_event(
                log,
                "rollout step",
                sequence=ev.sequence,
                version=ev.version,
                stage=ev.stage,
                reason=ev.reason,
                stable=ev.stable,
                canary=ev.canary or "-",
            )
        if events:
            self.book.watch(self._watched())
        return events

    def _watched(self) -> set[str]:
        s = self.state
        return {v for v in (s.stable, s.canary) if v}
