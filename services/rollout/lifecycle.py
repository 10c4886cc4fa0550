"""Each policy version's lifecycle, as a pure state machine whose every step is an event.

    state = RolloutState(stable="policy-0007")
    lc = Lifecycle(state, canary_share=0.1)
    events = lc.candidate("policy-0008", now)        # -> stage "canary" (or "candidate" when queued)
    events = lc.decide(gate_decision, now)           # -> "promoted" / "rolled_back" (+ the next canary)
    events = lc.promote("policy-0008", now, reason)  # operator steps: promote, rollback, pause, resume, mode
    state = RolloutState.rebuilt(stable, events)     # after a restart: fold the topic's events

    candidate --(slot free)--> canary --(gate or operator)--> promoted | rolled_back
        \\--(slot taken)--> queued --(a newer candidate arrives)--> superseded

One canary at a time: a candidate that arrives while another is in canary waits in the queue, and
only the newest one waits (the trainer publishes improvements of improvements; an older queued one
is superseded). Paused: an operator froze decisions; the canary keeps its traffic, the gate's
verdicts are recorded but not acted on, and no queued candidate starts. Manual mode: only operators
promote or roll back (the gate's verdict still goes into the events as advice).

Every step returns the RolloutEvents it made; each event carries the whole state after it
(stable, canary, share, queue, paused, mode), so the topic is the state: a restarted controller and
every follower (the gateway's router, the /flywheel page) need only the latest event.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shared.errors import FailedPrecondition, InvalidArgument
from shared.events import RolloutEvent

MODES = ("auto", "manual")


@dataclass
class RolloutState:
    stable: str
    canary: str = ""
    canary_since: float = 0.0
    canary_share: float = 0.0
    queued: str = ""
    paused: bool = False
    mode: str = "auto"
    sequence: int = 0
    """The sequence number of the last event."""

    @classmethod
    def rebuilt(cls, stable: str, events: Iterable[RolloutEvent]) -> RolloutState:
        """The state the events leave, starting from ``stable`` when there are none."""
        state = cls(stable)
        for ev in events:
            state.apply(ev)
        return state

    def apply(self, ev: RolloutEvent) -> None:
        """Take the state an event carries (events at or below the current sequence are ignored)."""
        if ev.sequence <= self.sequence:
            return
        if ev.canary != self.canary:
            self.canary_since = ev.at
        self.stable, self.canary, self.canary_share = ev.stable, ev.canary, ev.canary_share
        self.queued, self.paused, self.mode, self.sequence = ev.queued, ev.paused, ev.mode, ev.sequence


class Lifecycle:
    """Turns candidates, gate decisions and operator commands into rollout events."""

    def __init__(self, state: RolloutState, canary_share: float):
        if not 0 < canary_share < 1:
            raise ValueError(f"canary_share must be in (0, 1), got {canary_share}")
        self.state = state
        self.canary_share = canary_share

    # --- inputs --------------------------------------------------------------------------------------

    def candidate(self, version: str, now: float, evidence: dict[str, Any] | None = None) -> list[RolloutEvent]:
        """A version the trainer published (its guards passed): to canary now, or queued."""
        s = self.state
        if version in (s.stable, s.canary, s.queued):
            return []
        if not s.canary and not s.paused:
            return [self._start_canary(version, now, "a new candidate", evidence or {})]
        out = []
        if s.queued:
            out.append(self._step(s.queued, "superseded", f"{version} arrived while it waited", now, queued=""))
        out.append(
            self._step(
                version, "candidate", "waiting for the canary slot", now, queued=version, evidence=evidence or {}
            )
        )
        return out

    def decide(self, action: str, reason: str, evidence: dict[str, Any], now: float) -> list[RolloutEvent]:
        """Act on the live gate's decision about the current canary (not when paused or manual)."""
        s = self.state
        if not s.canary or s.paused or s.mode == "manual" or action == "continue":
            return []
        if action == "promote":
            return self._promoted(reason, evidence, now)
        if action == "rollback":
            return self._rolled_back(reason, evidence, now)
        raise ValueError(f"unknown gate action {action!r}")

    # --- operator commands ----------------------------------------------------------------------------

    def promote(self, version: str, now: float, reason: str = "promoted by an operator") -> list[RolloutEvent]:
        self._require_canary(version)
        return self._promoted(reason, {}, now)

    def rollback(self, version: str, now: float, reason: str = "rolled back by an operator") -> list[RolloutEvent]:
        self._require_canary(version)
        return self._rolled_back(reason, {}, now)

    def pause(self, now: float, reason: str = "paused by an operator") -> list[RolloutEvent]:
        if self.state.paused:
            return []
        return [self._step(self.state.canary or self.state.stable, "paused", reason, now, paused=True)]

    def resume(self, now: float, reason: str = "resumed by an operator") -> list[RolloutEvent]:
        if not self.state.paused:
            return []
        out = [self._step(self.state.canary or self.state.stable, "resumed", reason, now, paused=False)]
        return out + self._next_canary(now)

    def set_mode(self, mode: str, now: float) -> list[RolloutEvent]:
        if mode not in MODES:
            raise InvalidArgument(f"mode must be auto or manual, got {mode!r}", param="mode")
        if mode == self.state.mode:
            return []
        return [self._step(self.state.canary or self.state.stable, "mode", f"mode set to {mode}", now, mode=mode)]

    # --- transitions ---------------------------------------------------------------------------------

    def _require_canary(self, version: str) -> None:
        if not self.state.canary:
            raise FailedPrecondition("no version is in canary", param="version")
        if version != self.state.canary:
            raise FailedPrecondition(f"{version} is not the canary ({self.state.canary} is)", param="version")

    def _start_canary(self, version: str, now: float, reason: str, evidence: dict[str, Any]) -> RolloutEvent:
        return self._step(
            version, "canary", reason, now, canary=version, canary_share=self.canary_share, queued="",
            evidence=evidence,
        )  # fmt: skip

    def _promoted(self, reason: str, evidence: dict[str, Any], now: float) -> list[RolloutEvent]:
        version = self.state.canary
        ev = self._step(
            version, "promoted", reason, now, stable=version, canary="", canary_share=0.0, evidence=evidence
        )
        return [ev, *self._next_canary(now)]

    def _rolled_back(self, reason: str, evidence: dict[str, Any], now: float) -> list[RolloutEvent]:
        version = self.state.canary
        ev = self._step(version, "rolled_back", reason, now, canary="", canary_share=0.0, evidence=evidence)
        return [ev, *self._next_canary(now)]

    def _next_canary(self, now: float) -> list[RolloutEvent]:
        s = self.state
        if s.canary or s.paused or not s.queued:
            return []
        return [self._start_canary(s.queued, now, "next in the queue", {})]

    def _step(self, version: str, stage: str, reason: str, now: float, **changes: Any) -> RolloutEvent:
        s = self.state
        after = dataclasses.replace(s, **{k: v for k, v in changes.items() if k != "evidence"})
        ev = RolloutEvent(
            sequence=s.sequence + 1,
            version=version,
            stage=stage,
            reason=reason,
            stable=after.stable,
            canary=after.canary,
            canary_share=after.canary_share,
            paused=after.paused,
            mode=after.mode,
            queued=after.queued,
            evidence=dict(changes.get("evidence") or {}),
            at=now,
        )
        s.apply(ev)
        return ev
