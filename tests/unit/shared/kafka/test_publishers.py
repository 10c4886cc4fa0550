"""The outbox's rules with a scripted publisher (the real broker: tests/integration/test_outbox_spill.py):
a record that keeps failing while the broker answers is moved aside and the rest flow in order;
while the broker is unreachable nothing is moved aside and nothing reordered; what a closed (or
killed) outbox left in its spill journal is sent by the next one; the memory queue is capped in
bytes."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from shared.events import FeedbackEvent, RatedResponse
from shared.kafka import envelope
from shared.kafka.metrics import EVENTS_DROPPED, OUTBOX_MOVED_ASIDE
from shared.kafka.publishers import Outbox, PublishFailed
from shared.kafka.spill import ASIDE_NAME, decode

TOPIC = "rlhf.test-outbox"


@dataclass
class ScriptedPublisher:
    """Accepts every record except those whose feedback id is poisoned, and none while ``down``."""

    service: str = "test"
    down: bool = False
    poison: str = "f-poison"

    def __post_init__(self) -> None:
        self.sent: list[str] = []
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def send_and_wait(self, topic: str, value: bytes, key: bytes | None) -> None:
        fid = envelope.decode(value).payload.feedback_id
        if self.down or fid == self.poison:
            raise PublishFailed(f"{topic}: refused {fid}")
        with self.lock:
            self.sent.append(fid)

    def send_many_and_wait(self, records: list[tuple[str, bytes, bytes | None]]) -> list[str | None]:
        self.batches.append(len(records))
        out: list[str | None] = []
        for topic, value, key in records:
            try:
                self.send_and_wait(topic, value, key)
                out.append(None)
            except PublishFailed as exc:
                out.append(str(exc))
        return out

    def reachable(self, topic: str) -> bool:
        return not self.down

    def close(self, timeout_s: float = 5.0) -> None:
        pass


def rating(fid: str, comment: str = "") -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=fid,
        kind="thumb",
        user_id="u",
        target=f"thumb:{fid}",
        revision=1,
        supersedes=None,
        responses=[RatedResponse("r", "policy-0001", "p")],
        thumb="up",
        comment=comment,
    )


def test_a_record_that_keeps_failing_is_moved_aside_and_the_rest_flow_in_order(tmp_path):
    before = OUTBOX_MOVED_ASIDE.labels(TOPIC)._value.get()
    publisher = ScriptedPublisher()
    outbox = Outbox(publisher, max_backoff_s=0.01, max_attempts=3, spill_dir=tmp_path / "spill", window=1)
    for fid in ("f-1", "f-poison", "f-2", "f-3"):
        outbox.publish(TOPIC, rating(fid), key="k")
    assert outbox.flush(10)
    assert publisher.sent == ["f-1", "f-2", "f-3"]
    assert OUTBOX_MOVED_ASIDE.labels(TOPIC)._value.get() == before + 1
    outbox.close(1)
    aside = (tmp_path / "spill" / ASIDE_NAME).read_bytes()
    assert envelope.decode(decode(aside[8:]).value).payload.feedback_id == "f-poison"


def test_while_the_broker_refuses_everything_nothing_is_moved_aside():
    before = OUTBOX_MOVED_ASIDE.labels(TOPIC)._value.get()
    publisher = ScriptedPublisher(down=True)
    outbox = Outbox(publisher, max_backoff_s=0.01, max_attempts=2)
    for n in range(3):
        outbox.publish(TOPIC, rating(f"f-{n}"), key="k")
    assert not outbox.flush(0.5)  # dozens of failed attempts by now
    assert outbox.pending == 3 and OUTBOX_MOVED_ASIDE.labels(TOPIC)._value.get() == before
    publisher.down = False
    assert outbox.flush(10) and publisher.sent == ["f-0", "f-1", "f-2"]
    outbox.close(1)


def test_what_an_outbox_could_not_send_is_sent_by_the_next_one_on_the_same_spill_dir(tmp_path):
    down = ScriptedPublisher(down=True)
    first = Outbox(down, max_backoff_s=0.01, spill_dir=tmp_path / "spill")
    for n in range(4):
        first.publish(TOPIC, rating(f"f-{n}"), key="k")
    first.close(0.2)  # the broker never came: the events stay in the journal
    assert (tmp_path / "spill").is_dir()
    up = ScriptedPublisher()
    second = Outbox(up, max_backoff_s=0.01, spill_dir=tmp_path / "spill")
    assert second.replayed == 4
    assert second.flush(10) and up.sent == ["f-0", "f-1", "f-2", "f-3"]
    second.close(1)
    assert not (tmp_path / "spill").exists()  # all sent: nothing left behind


def test_the_memory_outbox_is_capped_in_bytes_and_counts_what_it_drops():
    before = EVENTS_DROPPED.labels(TOPIC)._value.get()
    publisher = ScriptedPublisher(down=True)
    outbox = Outbox(publisher, max_backoff_s=0.01, capacity=1000, capacity_bytes=20_000)
    for n in range(20):
        outbox.publish(TOPIC, rating(f"f-{n}", comment="x" * 2000), key="k")
    assert outbox.pending_bytes <= 20_000 and outbox.pending < 20
    assert EVENTS_DROPPED.labels(TOPIC)._value.get() == before + 20 - outbox.pending
    publisher.down = False
    assert outbox.flush(10) and publisher.sent[-1] == "f-19"  # the newest survived
    outbox.close(1)


def test_records_go_out_in_windows_and_a_failure_inside_one_resends_only_what_followed_it(tmp_path):
    publisher = ScriptedPublisher()
    outbox = Outbox(publisher, max_backoff_s=0.01, max_attempts=2, spill_dir=tmp_path / "spill", window=16)
    publisher.down = True  # everything waits, then goes out in windows
    fids = [f"f-{n}" for n in range(40)]
    fids.insert(5, "f-poison")
    for fid in fids:
        outbox.publish(TOPIC, rating(fid), key="k")
    publisher.down = False
    assert outbox.flush(10)
    outbox.close(1)
    assert list(dict.fromkeys(publisher.sent)) == [f for f in fids if f != "f-poison"]  # in order
    assert len(publisher.sent) - 40 <= 16  # resent: at most what followed the poison in its window
    assert max(publisher.batches) == 16 and len(publisher.batches) < 20
