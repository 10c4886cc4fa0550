"""The feedback service bounded, on a real broker: vote revisions go on across a restart (the ledger
is rebuilt from rlhf.feedback), a restart replays only the token lifetime's ratings (older records
are not even read), and the dead-letter copies of refused ratings are limited."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
from kafka import KafkaProducer

from services.feedback.config import FeedbackConfig
from services.feedback.domain import Submission
from services.feedback.ledger import FeedbackLedger, LedgerFollower
from services.feedback.serving import FeedbackServing
from shared.config import FeedbackTokenConfig, load_config
from shared.events import FeedbackEvent, RatedResponse
from shared.feedback_token import TokenClaims, sign
from shared.kafka import envelope
from shared.kafka.publishers import KafkaPublisher, Outbox, RdKafkaPublisher
from shared.kafka.readers import AssignedReader
from shared.kafka.topics import FEEDBACK, FEEDBACK_DLQ
from tests.conftest import start_broker

pytestmark = pytest.mark.integration

SECRET = "s" * 32


def thumb(user: str, rid: str, value: str) -> Submission:
    token = sign(SECRET, TokenClaims(rid, "policy-0001", "p1", int(time.time()) + 600, principal=user))
    return Submission("thumb", [rid], [token], user, thumb=value)


class Service:
    """What FeedbackApp wires, started against a broker: the ledger rebuilt from the topic first."""

    def __init__(self, kafka, **cfg):
        cfg.setdefault("token", FeedbackTokenConfig(secret=SECRET))
        self.cfg = load_config(FeedbackConfig, {}, kafka=kafka, **cfg)
        self.ledger = FeedbackLedger(
            token_ttl_s=self.cfg.token.ttl_s, slack_s=self.cfg.ledger_slack_s, max_votes=self.cfg.ledger_max_votes
        )
        self.follower = LedgerFollower(kafka, self.ledger)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.follower.run, args=(self.stop_event,), daemon=True)
        self.thread.start()
        assert self.follower.caught_up.wait(30), "the ledger was not rebuilt"
        self.publisher = RdKafkaPublisher(kafka, "feedback")
        self.dlq = Outbox(KafkaPublisher(kafka, "feedback"))
        self.serving = FeedbackServing(self.cfg, self.publisher, self.dlq, self.ledger)

    def submit(self, s: Submission):
        return asyncio.run(self.serving.submit(s, lambda: "raw"))

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        self.publisher.close()
        self.dlq.close(10)


def test_revisions_go_on_across_a_restart(broker):
    user, rid = f"u-{uuid.uuid4().hex[:8]}", f"r-{uuid.uuid4().hex[:8]}"
    first = Service(broker.kafka)
    try:
        assert first.submit(thumb(user, rid, "up")).revision == 1
        assert first.submit(thumb(user, rid, "down")).revision == 2
    finally:
        first.close()
    restarted = Service(broker.kafka)
    try:
        again = restarted.submit(thumb(user, rid, "up"))
        assert again.revision == 3 and not again.duplicate, "numbering goes on from the topic, never from 1"
        assert restarted.submit(thumb(user, rid, "up")).duplicate
    finally:
        restarted.close()


def test_a_restart_replays_only_the_token_lifetime():
    """Kafka's time index is by append time on tansu: the "expired" ratings are written, then the
    token lifetime (2 s here) passes, then one more rating is written."""
    own = start_broker()
    try:
        producer = KafkaProducer(bootstrap_servers=own.kafka.servers)

        def write(fid: str) -> None:
            ev = FeedbackEvent(
                fid,
                "thumb",
                "u1",
                f"thumb:{fid}",
                1,
                None,
                [RatedResponse(fid, "p", "h")],
                thumb="up",
                received_at=time.time(),
            )
            producer.send(FEEDBACK, value=envelope.encode(envelope.wrap(ev, "feedback")), partition=0).get(10)

        for n in range(40):
            write(f"old-{n}")
        time.sleep(3.0)  # every token those 40 could carry has expired
        write("recent")
        producer.close()
        service = Service(own.kafka, token=FeedbackTokenConfig(secret=SECRET, ttl_s=2), ledger_slack_s=0.0)
        try:
            assert service.follower._reader.start_offsets[(FEEDBACK, 0)] == 40, "the expired records are not read"
            assert service.follower._reader.start_offsets[(FEEDBACK, 1)] == 0, "an empty partition: its end"
            assert len(service.ledger) == 1 and service.ledger.has("recent")
        finally:
            service.close()
    finally:
        own.broker.stop()


def test_dead_letter_copies_are_limited():
    own = start_broker()
    try:
        service = Service(own.kafka, dlq_rate_per_s=0.01, dlq_burst=5)
        try:
            bad = [(thumb("u1", f"r{n}", "sideways"), lambda: "raw " * 100) for n in range(50)]
            outcomes = asyncio.run(service.serving.submit_many(bad))
            assert all(type(o).__name__ == "InvalidArgument" for o in outcomes)
            assert service.dlq.flush(20)
        finally:
            service.close()
        reader = AssignedReader(own.kafka, "test", [FEEDBACK_DLQ], start="beginning")
        got = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got += reader.poll()
        reader.close()
        assert len(got) == 5, "the burst is copied, the other 45 refusals are only counted"
    finally:
        own.broker.stop()
