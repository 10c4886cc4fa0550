"""The controller's ``PolicyPointers`` on the policy line: the stable group follows the ``current``
pointer, the canary group the ``canary`` pointer (shared/version_line.py), each moved in the model
store and announced signed with the rollout service's key.

    pointers = LinePointers(store, publisher, signer=key)
    pointers.serve_canary("policy-0008")    # policy.canary -> policy-0008, announced on rlhf.policy-canary
    pointers.serve_stable("policy-0008")    # policy.current -> policy-0008, announced on rlhf.policy-updates
    pointers.announce_owed()                # retry what Kafka did not acknowledge (every tick)

Moving a pointer to where it already is changes nothing (the restore after a restart repeats
every move); what is owed stays owed in the store until Kafka acknowledges it, so a rollout service
killed between moving and announcing announces on its next start.
"""

from __future__ import annotations

from typing import Any

from shared.logging import get_logger, log_event
from shared.model_store import ModelStore
from shared.signing import SigningKey
from shared.version_line import POLICY, POLICY_CANARY, KafkaAnnouncer, LineKind, VersionLine

log = get_logger(__name__)


class LinePointers:
    """``PolicyPointers`` (services/rollout/controller.py) on the policy line's pointers."""

    def __init__(self, store: ModelStore, publisher: Any, *, signer: SigningKey | None):
        self.lines = {
            kind.pointer: VersionLine(store, kind, KafkaAnnouncer(publisher, kind), signer=signer)
            for kind in (POLICY, POLICY_CANARY)
        }
        """``current`` and ``canary``: each a version line with its own record and sequence."""

    def serve_canary(self, version: str) -> None:
        self._move(POLICY_CANARY, version)

    def serve_stable(self, version: str) -> None:
        self._move(POLICY, version)

    def where(self) -> dict[str, str | None]:
        """Where each pointer points in the store now."""
        return {name: line.pointed() for name, line in self.lines.items()}

    def owed(self) -> list[str]:
        """The pointers whose announcement is owed."""
        return [name for name, line in self.lines.items() if line.pending_announcement() is not None]

    def announce_owed(self) -> bool:
        """Announce every owed pointer; True when nothing is owed any more."""
        done = True
        for line in self.lines.values():
            if line.pending_announcement() is not None and line.announce_pending() is None:
                done = False  # logged and counted by the line; retried on the next call
        return done

    def _move(self, kind: LineKind, version: str) -> None:
        line = self.lines[kind.pointer]
        before = line.pointed()
        line.point_to(version)
        if before != version:
            log_event(log, "pointer moved", pointer=kind.label, version=version, previous=before or "-")
        line.announce_pending()
