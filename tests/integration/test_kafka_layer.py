"""The Kafka layer's two reader shapes and its publishers against the real embedded broker: both
assigned readers (kafka-python and librdkafka) read the same records; start at the beginning, the
end or stored offsets, and a recreated topic is read from its start; the outbox holds records while
the broker is down and delivers them, in order, once it is back."""

from __future__ import annotations

import time

import pytest

from shared.events import FeedbackEvent, RatedResponse
from shared.kafka.embedded import free_port
from shared.kafka.publishers import KafkaPublisher, Outbox, PublishFailed
from shared.kafka.readers import AssignedReader, RdKafkaAssignedReader, decode_or_skip
from shared.kafka.topics import FEEDBACK_DLQ
from tests.conftest import start_broker

pytestmark = pytest.mark.integration


def rating(n: int) -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=f"f-{n}",
        kind="thumb",
        user_id=f"u-{n % 5}",
        target=f"thumb:r-{n}",
        revision=1,
        supersedes=None,
        responses=[RatedResponse(f"r-{n}", "policy-0001", "p")],
        thumb="up",
    )


def read_all(reader, want: int, timeout_s: float = 20.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < deadline:
        out += reader.poll()
    reader.close()
    return out


def ids(records) -> set[str]:
    return {decode_or_skip(r).payload.feedback_id for r in records}


@pytest.fixture(scope="module")
def own():
    b = start_broker()
    yield b
    b.broker.stop()


def test_both_assigned_readers_read_the_same_records_from_every_partition(own):
    publisher = KafkaPublisher(own.kafka, "test")
    for n in range(30):
        publisher.publish_and_wait(FEEDBACK_DLQ, rating(n), key=f"u-{n % 5}")
    publisher.close()
    python = read_all(AssignedReader(own.kafka, "test", [FEEDBACK_DLQ], start="beginning"), 30)
    rdkafka = read_all(RdKafkaAssignedReader(own.kafka, "test", [FEEDBACK_DLQ], start="beginning"), 30)
    assert len(python) == len(rdkafka) == 30
    assert sorted(python) == sorted(rdkafka)  # topic, partition, offset, key and value alike
    assert len({r.partition for r in python}) > 1 and ids(python) == {f"f-{n}" for n in range(30)}


def test_an_assigned_reader_starts_at_the_end_or_at_stored_offsets(own):
    publisher = KafkaPublisher(own.kafka, "test")
    for n in range(100, 106):
        publisher.publish_and_wait(FEEDBACK_DLQ, rating(n), key="same-key")  # one partition
    at_end = AssignedReader(own.kafka, "test", [FEEDBACK_DLQ], start="end")
    head = AssignedReader(own.kafka, "test", [FEEDBACK_DLQ], start="beginning")
    records = [r for r in read_all(head, 36) if decode_or_skip(r).payload.feedback_id.startswith("f-10")]
    part = (records[0].topic, records[0].partition)
    resume = {part: records[3].offset}  # as if the first three had been stored by the caller
    publisher.publish_and_wait(FEEDBACK_DLQ, rating(200), key="same-key")
    publisher.close()
    assert ids(read_all(at_end, 1)) == {"f-200"}  # only what came after it was made
    resumed = [r for r in read_all(AssignedReader(own.kafka, "test", [FEEDBACK_DLQ], start=resume), 36)
               if r.partition == part[1]]  # fmt: skip
    assert [decode_or_skip(r).payload.feedback_id for r in resumed] == ["f-103", "f-104", "f-105", "f-200"]
    # A stored offset beyond the end: the topic was recreated; its partition is read from the start.
    recreated = read_all(AssignedReader(own.kafka, "test", [FEEDBACK_DLQ], start={part: 10_000}), 37)
    assert {"f-100", "f-200"} <= ids(recreated)


def test_the_outbox_holds_records_while_the_broker_is_down_and_delivers_them_in_order():
    port = free_port()
    down = start_broker(port)  # for the config; stopped at once: the broker is down
    kafka = down.kafka
    down.broker.stop()
    outbox = Outbox(KafkaPublisher(kafka, "test"), max_backoff_s=0.5)
    for n in range(5):
        outbox.publish(FEEDBACK_DLQ, rating(300 + n), key="k")
    with pytest.raises(PublishFailed):
        KafkaPublisher(kafka, "test").publish_and_wait(FEEDBACK_DLQ, rating(399), key="k")
    assert not outbox.flush(2) and outbox.pending == 5
    back = start_broker(port)  # the same address, topics created again (memory-only broker)
    try:
        assert outbox.flush(60), "the outbox did not deliver after the broker came back"
        outbox.close()
        got = read_all(AssignedReader(back.kafka, "test", [FEEDBACK_DLQ], start="beginning"), 5)
        assert [decode_or_skip(r).payload.feedback_id for r in got] == [f"f-{300 + n}" for n in range(5)]
    finally:
        back.broker.stop()
