"""The controller's pointers on the policy line: each move is written to the store and announced
once; repeating it changes nothing; an unacknowledged announcement stays owed."""

from __future__ import annotations

from pathlib import Path

from services.rollout.pointers import LinePointers
from shared.events import PolicyCanaryEvent, PolicyUpdateEvent
from shared.kafka.topics import POLICY_CANARY, POLICY_UPDATES
from shared.model_store import ModelStore
from shared.signing import SigningKey
from shared.version_line import POLICY, VersionLine

KEY = SigningKey.generate()


class Publisher:
    def __init__(self, failures: int = 0) -> None:
        self.sent: list = []
        self.failures = failures

    def publish_and_wait(self, topic, payload, key=None):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("down")
        self.sent.append((topic, key, payload))


def store_with_two(tmp_path: Path) -> ModelStore:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"\0" * 8)
    store = ModelStore(tmp_path / "models")
    line = VersionLine(store, POLICY, signer=KEY)
    line.publish(src)
    line.publish(src, make_current=False)
    return store


def test_moves_are_written_and_announced_once(tmp_path):
    store = store_with_two(tmp_path)
    publisher = Publisher()
    pointers = LinePointers(store, publisher, signer=KEY)
    pointers.serve_canary("policy-0002")
    pointers.serve_canary("policy-0002")
    pointers.serve_stable("policy-0002")
    assert pointers.where() == {"current": "policy-0002", "canary": "policy-0002"}
    assert [(t, k, type(p), p.version) for t, k, p in publisher.sent] == [
        (POLICY_CANARY, "policy.canary", PolicyCanaryEvent, "policy-0002"),
        (POLICY_UPDATES, "policy", PolicyUpdateEvent, "policy-0002"),
    ]
    assert pointers.owed() == []


def test_an_unacknowledged_move_stays_owed_until_announced(tmp_path):
    store = store_with_two(tmp_path)
    publisher = Publisher(failures=1)
    pointers = LinePointers(store, publisher, signer=KEY)
    pointers.serve_canary("policy-0002")
    assert publisher.sent == [] and pointers.owed() == ["canary"]
    # A new process on the same store (restarted) owes the same.
    again = LinePointers(store, publisher, signer=KEY)
    assert again.owed() == ["canary"] and again.announce_owed() and again.owed() == []
    assert [p.sequence for _, _, p in publisher.sent] == [1]
