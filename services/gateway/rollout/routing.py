"""Which policy version serves a chat request: the routing state the rollout service publishes, and
the assignment rule.

    router = Router(canary_enabled=True)
    router.apply(event)                              # each RolloutEvent from rlhf.rollout, in topic order
    route = router.route("alice", "conv-1")          # -> Route("canary", "policy-0008") or Route("stable", ...)

**Assignment** (``in_canary``): a request goes to the canary when

    u(canary, principal, conversation) < canary_share,
    u = (first 8 bytes of SHA-256(canary NUL principal NUL (conversation_id or principal))) / 2^64,

a number spread uniformly over [0, 1) by the hash. Its properties:

- *pure*: every gateway replica routes a request the same way, with no state shared between them;
- *sticky*: while one canary runs (the same version, the same share) a conversation, or a principal
  without a conversation id, always gets the same version;
- *the split*: over N principals/conversations the canary's share is ``canary_share`` up to the
  binomial error sqrt(s (1 - s) / N);
- *monotone in the share*: raising the share only moves conversations into the canary, never out;
- *a fresh draw per canary*: the version is hashed too, so the same users do not try every canary.

A conversation that began before a canary started may move to it when it starts (a share of them),
and every canary conversation returns to the stable version when the canary ends; nothing else
changes a conversation's version. Users outside the canary's share never get the canary: when no
canary runs, every request goes to the stable group (the canary group idles, never as spare
capacity, which would serve its next canary to anyone the moment it swaps).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from shared.events import RolloutEvent

STABLE = "stable"
CANARY = "canary"


def assignment_point(canary: str, principal: str, conversation_id: str | None) -> float:
    """u in [0, 1): the first 8 bytes of SHA-256(canary NUL principal NUL (conversation_id or
    principal)) as an unsigned big-endian integer, divided by 2^64."""
    key = "\0".join((canary, principal, conversation_id or principal)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64


def in_canary(canary: str, share: float, principal: str, conversation_id: str | None) -> bool:
    """Whether a request of ``principal`` in ``conversation_id`` goes to ``canary``: u < share
    (never with no canary or a share of 0)."""
    return bool(canary) and share > 0 and assignment_point(canary, principal, conversation_id) < share


@dataclass(frozen=True)
class RoutingState:
    """The routing part of the latest rollout event (every event carries the whole state)."""

    stable: str = ""
    """The version every user outside the canary gets ("" before the first event: whatever the
    stable group serves)."""
    canary: str = ""
    canary_share: float = 0.0
    sequence: int = 0
    at: float = 0.0
    """When the rollout service took the step that left this state."""

    @classmethod
    def of(cls, ev: RolloutEvent) -> RoutingState:
        share = min(1.0, max(0.0, float(ev.canary_share))) if ev.canary else 0.0
        return cls(ev.stable, ev.canary, share, ev.sequence, ev.at)


@dataclass(frozen=True)
class Route:
    group: str
    """STABLE or CANARY: which group of inference replicas serves the request."""
    version: str
    """The version the routing state expects that group to serve ("" when unknown)."""


ROUTED_GROUPS = (STABLE, CANARY, "side_by_side", "canary_fallback")
"""What ``Router.count`` counts: requests served by the stable group, by the canary group, n=2
requests answered once by each (side by side), and canary requests the stable group served because
the canary group was unavailable."""


class Router:
    """The routing state (replaced whole by the feed's thread, read by requests) and the rule."""

    def __init__(self, canary_enabled: bool):
        self.canary_enabled = canary_enabled
        """False without a canary inference address: every request goes to the stable group."""
        self.state = RoutingState()
        self.routed = dict.fromkeys(ROUTED_GROUPS, 0)
        """This gateway's requests by ROUTED_GROUPS since the current canary started (or ended)."""

    def count(self, group: str) -> None:
        """One more request of ``group`` (one of ROUTED_GROUPS)."""
        self.routed[group] += 1

    def apply(self, ev: RolloutEvent) -> bool:
        """Take the state of the next event of the topic; True when the routing changed. Events
        come in topic order (one partition), so the latest one read is the state, whatever its
        sequence number (a rollout service whose topic was recreated starts again at 1)."""
        new = RoutingState.of(ev)
        old, self.state = self.state, new
        if old.canary != new.canary:
            self.routed = dict.fromkeys(ROUTED_GROUPS, 0)
        return (old.stable, old.canary, old.canary_share) != (new.stable, new.canary, new.canary_share)

    @property
    def canary_share(self) -> float:
        """The share of requests routed to the canary now (0 when none runs or canaries are off)."""
        s = self.state
        return s.canary_share if self.canary_enabled and s.canary else 0.0

    def route(self, principal: str, conversation_id: str | None) -> Route:
        s = self.state  # one read: a concurrent apply() cannot mix two states
        if self.canary_enabled and in_canary(s.canary, s.canary_share, principal, conversation_id):
            return Route(CANARY, s.canary)
        return Route(STABLE, s.stable)
