"""RdKafkaPublisher (librdkafka) against the real embedded broker: a returned publish is on the
topic, concurrent records keep their per-key order and land where kafka-python would put them,
and a broker outage fails publishes within the delivery timeout, after which publishing recovers."""

import asyncio
import dataclasses
import time

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from shared.events import FeedbackEvent, RatedResponse
from shared.kafka.admin import ensure_topics
from shared.kafka.embedded import EmbeddedBroker
from shared.kafka.envelope import decode
from shared.kafka.publishers import PublishFailed, RdKafkaPublisher
from shared.kafka.topics import FEEDBACK
from tests.conftest import start_broker

pytestmark = pytest.mark.integration


def rating(user: str, n: int) -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=f"{user}-{n}",
        kind="thumb",
        user_id=user,
        target=f"thumb:{user}-{n}",
        revision=n,
        supersedes=None,
        responses=[RatedResponse(f"{user}-{n}", "policy-0001", "p")],
        thumb="up",
        received_at=time.time(),
    )


def records(kafka, prefix: str) -> list:
    """(partition, key, payload) of every record on rlhf.feedback whose user starts with prefix."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.servers, enable_auto_commit=False)
    try:
        parts = [TopicPartition(FEEDBACK, p) for p in sorted(consumer.partitions_for_topic(FEEDBACK))]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        out = []
        while any(consumer.position(tp) < end[tp] for tp in parts):
            for tp, batch in consumer.poll(timeout_ms=500).items():
                for r in batch:
                    payload = decode(r.value, expect=FeedbackEvent).payload
                    if payload.user_id.startswith(prefix):
                        out.append((tp.partition, r.key, payload))
        return out
    finally:
        consumer.close()


def test_a_returned_publish_is_on_the_topic_with_its_key(broker):
    publisher = RdKafkaPublisher(broker.kafka, "test")
    event = rating("solo-u", 1)
    try:
        env = asyncio.run(publisher.publish(FEEDBACK, event, key="solo-u"))
        # Read right after the call returned: acks=all means the broker has it already.
        [(_, key, payload)] = records(broker.kafka, "solo-u")
        assert key == b"solo-u" and payload == event and env.payload is event
    finally:
        publisher.close()


def test_concurrent_publishes_all_land_once_in_per_key_order_on_kafka_pythons_partition(broker):
    publisher = RdKafkaPublisher(broker.kafka, "test")
    users = [f"conc-u{i}" for i in range(8)]

    async def publish_user(user: str) -> None:
        for n in range(25):  # one user's votes one after another, as the feedback service writes them
            await publisher.publish(FEEDBACK, rating(user, n), key=user)

    async def publish_all() -> None:
        await asyncio.wait_for(asyncio.gather(*(publish_user(u) for u in users)), 60)

    try:
        asyncio.run(publish_all())
    finally:
        publisher.close()
    found = records(broker.kafka, "conc-u")
    assert len(found) == len(users) * 25
    assert len({p.feedback_id for _, _, p in found}) == len(found), "no record written twice"
    partitions = broker.kafka.topic_partitions
    for user in users:
        mine = [(tp, p.revision) for tp, key, p in found if key == user.encode()]
        assert [rev for _, rev in mine] == list(range(25)), f"{user}'s votes out of order"
        assert {tp for tp, _ in mine} == {(murmur2(user.encode()) & 0x7FFFFFFF) % partitions}


def test_broker_down_fails_within_the_delivery_timeout_and_publishing_recovers():
    own = start_broker()
    kafka = dataclasses.replace(own.kafka, delivery_timeout_s=3.0, request_timeout_ms=2000)
    publisher = RdKafkaPublisher(kafka, "test")
    try:
        asyncio.run(publisher.publish(FEEDBACK, rating("down-u", 1), key="down-u"))
        port = own.broker.port
        own.broker.stop()
        started = time.monotonic()
        with pytest.raises(PublishFailed):
            asyncio.run(publisher.publish(FEEDBACK, rating("down-u", 2), key="down-u"))
        assert time.monotonic() - started < kafka.delivery_timeout_s + 3

        own.broker = EmbeddedBroker(port=port).start()  # memory storage: the topics must be created again
        ensure_topics(kafka)
        deadline = time.monotonic() + 30
        while True:
            try:
                asyncio.run(publisher.publish(FEEDBACK, rating("down-u", 3), key="down-u"))
                break
            except PublishFailed:
                assert time.monotonic() < deadline, "publishing did not recover after the broker returned"
        assert [p.revision for _, _, p in records(kafka, "down-u")] == [3], "only acknowledged records exist"
    finally:
        publisher.close()
        own.broker.stop()


def test_a_record_without_a_delivery_report_fails_after_its_deadline_instead_of_hanging():
    from shared.kafka.publishers import _LoopDeliveries

    async def scenario():
        deliveries = _LoopDeliveries(asyncio.get_running_loop(), deadline_s=0.2)
        reported, silent = deliveries.expect(), deliveries.expect()
        deliveries.put(reported, None)
        started = time.monotonic()
        return await reported, await asyncio.wait_for(silent, 5), time.monotonic() - started

    ok, err, waited = asyncio.run(scenario())
    assert ok is None
    assert "no delivery report" in err and waited < 2.5


def test_warm_up_connects_before_the_first_publish_and_reports_an_absent_broker(broker):
    publisher = RdKafkaPublisher(broker.kafka, "test")
    try:
        assert publisher.warm_up(timeout_s=10)
        asyncio.run(publisher.publish(FEEDBACK, rating("warm-u", 1), key="warm-u"))
    finally:
        publisher.close()
    nowhere = dataclasses.replace(broker.kafka, bootstrap_servers="127.0.0.1:1")
    absent = RdKafkaPublisher(nowhere, "test")
    try:
        assert absent.warm_up(timeout_s=1) is False
    finally:
        absent.close(timeout_s=0)
