"""What the embedded broker keeps across a restart, shown on the real tansu (the README's promise):

- memory storage (what `rlhf up` runs): a restart loses every record and the topics themselves
  (they are created again, empty), and publishing works again afterwards;
- the durable option that was evaluated and refused, tansu's s3 engine on a local s3rver
  (shared/kafka/embedded.py, data_dir): acknowledged records and a consumer group's committed
  offset survive a kill -9 of the broker and of its S3 server as long as they are only read, but a
  record produced after a restart before any read is written at offset 0 and the earlier records
  are gone (a strict xfail: it fails the day a tansu release fixes it, so that the decision is
  made again); a second broker on the same directory is refused; lists past s3rver's page size
  work (Node's legacy OpenSSL provider).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition

from shared.config import KafkaConfig
from shared.events import FeedbackEvent, RatedResponse
from shared.kafka.admin import ensure_topics
from shared.kafka.embedded import BrokerError, EmbeddedBroker, s3rver_problem
from shared.kafka.envelope import decode
from shared.kafka.publishers import RdKafkaPublisher
from shared.kafka.topics import FEEDBACK

pytestmark = pytest.mark.integration

needs_s3rver = pytest.mark.skipif(
    s3rver_problem() is not None, reason=f"durable storage unavailable here: {s3rver_problem()}"
)


def rating(n: int) -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=f"durable-{n}",
        kind="thumb",
        user_id=f"u{n % 3}",
        target=f"thumb:r{n}",
        revision=1,
        supersedes=None,
        responses=[RatedResponse(f"r{n}", "policy-0001", "p")],
        thumb="up",
        received_at=time.time(),
    )


def kafka_of(broker: EmbeddedBroker) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=broker.bootstrap_servers,
        delivery_timeout_s=10.0,
        request_timeout_ms=3000,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )


def publish(kafka: KafkaConfig, first: int, count: int) -> None:
    publisher = RdKafkaPublisher(kafka, "test")
    try:
        out = asyncio.run(
            publisher.publish_many([(FEEDBACK, rating(n), f"u{n % 3}") for n in range(first, first + count)])
        )
        assert not [r for r in out if isinstance(r, Exception)], out
    finally:
        publisher.close()


def feedback_ids(kafka: KafkaConfig, expected: int, idle_s: float = 5.0) -> list[str]:
    """The feedback_ids on rlhf.feedback from the start: read until ``expected`` are in, or nothing
    came for ``idle_s`` (empty when the topic is gone). Not by end offsets: tansu 0.6.0's answer for
    a partition's latest offset is not its end."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.servers, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        tps = [TopicPartition(FEEDBACK, p) for p in sorted(consumer.partitions_for_topic(FEEDBACK) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[str] = []
        last = time.monotonic()
        while len(out) < expected and time.monotonic() - last < idle_s:
            for batch in consumer.poll(timeout_ms=200).values():
                out += [decode(r.value, expect=FeedbackEvent).payload.feedback_id for r in batch]
                last = time.monotonic()
        return out
    finally:
        consumer.close()


def committed(kafka: KafkaConfig, group: str, offset: int | None = None) -> int | None:
    """Commit ``offset`` for ``group`` on rlhf.feedback partition 0 (when given); return what is committed."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.servers, group_id=group, enable_auto_commit=False)
    try:
        tp = TopicPartition(FEEDBACK, 0)
        if offset is not None:
            consumer.commit({tp: OffsetAndMetadata(offset, None, -1)})
        return consumer.committed(tp)
    finally:
        consumer.close()


def wait_dead(broker: EmbeddedBroker) -> None:
    deadline = time.monotonic() + 10
    while broker.exit_code() is None:
        assert time.monotonic() < deadline, "the killed process is still running"
        time.sleep(0.05)


@needs_s3rver
def test_s3_storage_keeps_records_and_offsets_across_kill_9_while_they_are_only_read(tmp_path):
    broker = EmbeddedBroker(data_dir=tmp_path / "broker").start()
    try:
        assert broker.durable
        kafka = kafka_of(broker)
        ensure_topics(kafka)
        publish(kafka, 0, 40)
        assert committed(kafka, "learner", 25) == 25
        want = sorted(f"durable-{n}" for n in range(40))
        assert sorted(feedback_ids(kafka, 40)) == want

        os.kill(broker.pid, signal.SIGKILL)
        wait_dead(broker)
        broker.restart()
        ensure_topics(kafka)  # they exist: left as they are
        assert sorted(feedback_ids(kafka, 40)) == want, "records acknowledged before the kill are gone"
        assert committed(kafka, "learner") == 25, "the consumer group's offset is gone"

        # The S3 server dying is the broker's storage dying: both are started again.
        assert broker.s3 is not None and broker.s3.pid is not None
        os.kill(broker.s3.pid, signal.SIGKILL)
        wait_dead(broker)
        broker.restart()
        assert sorted(feedback_ids(kafka, 40)) == want
        # While this broker holds the directory, a second one on it is refused (it would corrupt it).
        with pytest.raises(BrokerError, match="another embedded broker is using"):
            EmbeddedBroker(data_dir=tmp_path / "broker").start()
    finally:
        broker.stop()


@needs_s3rver
@pytest.mark.xfail(
    strict=True,
    reason="tansu 0.6.0-510f3e2 s3 engine: the first produce after a restart, before any read, is "
    "written at offset 0 and the partition's earlier records are lost; why `rlhf up` keeps memory storage",
)
def test_s3_storage_keeps_records_when_a_producer_writes_first_after_a_restart(tmp_path):
    broker = EmbeddedBroker(data_dir=tmp_path / "broker").start()
    try:
        kafka = kafka_of(broker)
        ensure_topics(kafka)
        publish(kafka, 0, 20)
        broker.restart()  # a clean restart: SIGTERM
        publish(kafka, 20, 5)  # what every producer of the loop does as soon as the broker is back
        assert sorted(feedback_ids(kafka, 25)) == sorted(f"durable-{n}" for n in range(25))
    finally:
        broker.stop()


def test_memory_storage_loses_every_record_and_topic_on_restart_and_recovers():
    broker = EmbeddedBroker().start()
    try:
        assert not broker.durable
        kafka = kafka_of(broker)
        ensure_topics(kafka)
        publish(kafka, 0, 10)
        assert len(feedback_ids(kafka, 10)) == 10
        broker.restart()
        assert feedback_ids(kafka, 1, idle_s=2) == [], "memory storage: the topic itself is gone"
        ensure_topics(kafka)  # what `rlhf up`'s supervisor does after restarting it
        publish(kafka, 10, 3)
        assert sorted(feedback_ids(kafka, 3)) == [f"durable-{n}" for n in range(10, 13)]
    finally:
        broker.stop()


@needs_s3rver
def test_the_s3_server_pages_long_lists(tmp_path):
    """tansu lists a partition's batches; past one page (1,000 keys) s3rver needs a continuation token,
    which it makes with DES: without Node's legacy OpenSSL provider that list fails with a 500 and the
    topic cannot be read (found at 2,000 records)."""
    import re

    import httpx

    from shared.kafka.embedded import S3_BUCKET, LocalS3Server

    server = LocalS3Server(tmp_path / "s3").start()
    try:
        for i in range(3):
            assert httpx.put(f"{server.endpoint}/{S3_BUCKET}/k{i}", content=b"x").status_code == 200
        keys = []
        params = {"list-type": "2", "max-keys": "1"}
        for _ in range(5):  # one key per page: three pages
            page = httpx.get(f"{server.endpoint}/{S3_BUCKET}", params=params)
            assert page.status_code == 200, page.text
            keys += re.findall(r"<Key>([^<]+)</Key>", page.text)
            token = re.search(r"<NextContinuationToken>([^<]+)</NextContinuationToken>", page.text)
            if not token:
                break
            params = {"list-type": "2", "max-keys": "1", "continuation-token": token.group(1)}
        assert keys == ["k0", "k1", "k2"]
    finally:
        server.stop()
