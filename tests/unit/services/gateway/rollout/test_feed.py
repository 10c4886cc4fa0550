"""The rollout feed on a scripted reader (the real broker is in tests/integration/
test_rollout_routing.py): events reach the router and the board in topic order, a bad record is
skipped, the feed reports caught up once the topic is read to its end, and after a read failure it
resumes after the last event it handled instead of stepping back."""

from __future__ import annotations

import threading
import time

from services.gateway.rollout.board import FlywheelBoard
from services.gateway.rollout.feed import RolloutFeed
from services.gateway.rollout.routing import Router
from shared.config import KafkaConfig
from shared.events import RolloutEvent
from shared.kafka.envelope import encode, wrap
from shared.kafka.readers import Record
from shared.kafka.topics import ROLLOUT


def record(offset: int, sequence: int, canary: str = "policy-0008") -> Record:
    ev = RolloutEvent(
        sequence=sequence,
        version=canary or "policy-0007",
        stage="canary" if canary else "rolled_back",
        reason="test",
        stable="policy-0007",
        canary=canary,
        canary_share=1.0 if canary else 0.0,
        paused=False,
        mode="auto",
        at=float(sequence),
    )
    return Record(ROLLOUT, 0, offset, b"policy", encode(wrap(ev, "test")))


class ScriptedReader:
    """Hands out scripted batches, then nothing; raises where the script says so."""

    def __init__(self, batches: list):
        self.batches = list(batches)
        self.closed = False

    def poll(self) -> list[Record]:
        if not self.batches:
            time.sleep(0.01)
            return []
        batch = self.batches.pop(0)
        if isinstance(batch, Exception):
            raise batch
        return batch

    def lag(self) -> dict[str, int]:
        return {ROLLOUT: sum(len(b) for b in self.batches if isinstance(b, list))}

    def close(self) -> None:
        self.closed = True


def wait_for(predicate, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_events_reach_the_router_and_board_in_order_and_the_feed_catches_up():
    router, board = Router(canary_enabled=True), FlywheelBoard(10)
    bad = Record(ROLLOUT, 0, 1, None, b"not an envelope")
    reader = ScriptedReader([[record(0, 1)], [bad, record(2, 2, canary="")]])
    feed = RolloutFeed(KafkaConfig(), router, board, reader=lambda resume: reader)
    feed.start()
    try:
        assert feed.wait_caught_up(5)
        assert router.state.sequence == 2 and router.state.canary == ""
        assert [e.sequence for e in board.events] == [1, 2]
        assert feed.next_offsets == {(ROLLOUT, 0): 3}
        wait_for(lambda: feed.following)
    finally:
        feed.stop()
    assert reader.closed and not feed.following


def test_after_a_failure_the_feed_resumes_after_the_last_event_handled():
    router, board = Router(canary_enabled=True), FlywheelBoard(10)
    resumed: list = []
    readers = [
        ScriptedReader([[record(0, 1), record(1, 2, canary="")], RuntimeError("broker away")]),
        ScriptedReader([[record(2, 3, canary="policy-0009")]]),
    ]
    made = threading.Event()

    def make(resume):
        resumed.append(resume)
        if len(resumed) == 2:
            made.set()
        return readers[len(resumed) - 1]

    feed = RolloutFeed(KafkaConfig(), router, board, reader=make, retry_pause_s=0.01)
    feed.start()
    try:
        assert made.wait(5)
        wait_for(lambda: router.state.sequence == 3)
    finally:
        feed.stop()
    assert resumed == [None, {(ROLLOUT, 0): 2}]
    assert router.state.canary == "policy-0009" and readers[0].closed
    assert [e.sequence for e in board.events] == [1, 2, 3], "nothing was read twice"
