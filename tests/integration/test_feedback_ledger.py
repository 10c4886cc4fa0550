"""The ledger follower rebuilding from rlhf.feedback on a real broker: every valid rating ends up in
the ledger whether or not this replica wrote it, ratings it holds already are not checked again,
and bad records are counted and skipped, never fatal."""

import threading
import time

import pytest
from kafka import KafkaProducer

from services.feedback.ledger import FeedbackLedger, LedgerFollower, LiveVote
from shared.events import FeedbackEvent, RatedResponse
from shared.kafka import envelope
from shared.kafka.metrics import BAD_RECORDS
from shared.kafka.topics import FEEDBACK
from tests.conftest import start_broker

pytestmark = pytest.mark.integration


def rating(fid: str, user: str) -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=fid,
        kind="thumb",
        user_id=user,
        target=f"thumb:r-{fid}",
        revision=1,
        supersedes=None,
        responses=[RatedResponse(f"r-{fid}", "policy-0001", "p")],
        thumb="up",
        received_at=time.time(),
    )


def test_the_ledger_holds_every_valid_rating_and_skips_bad_records():
    own = start_broker()
    mine, theirs = rating("f-mine", "u1"), rating("f-theirs", "u2")
    producer = KafkaProducer(bootstrap_servers=own.kafka.servers)
    for value in (
        envelope.encode(envelope.wrap(mine, "feedback")),
        b"\xff not json",
        b'{"payload": {"feedback_id": ["x"]}}',
        envelope.encode(envelope.wrap(theirs, "feedback")),
    ):
        producer.send(FEEDBACK, value=value).get(10)
    producer.close()
    ledger = FeedbackLedger()
    ledger.apply(mine)  # as the service does once Kafka acknowledged its own write
    bad_before = BAD_RECORDS.labels(FEEDBACK)._value.get()
    stop = threading.Event()
    follower = LedgerFollower(own.kafka, ledger)
    thread = threading.Thread(target=follower.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert follower.caught_up.wait(20), "the follower did not reach the end of the topic"
        assert ledger.has("f-mine") and ledger.has("f-theirs") and len(ledger) == 2
        assert ledger.live("u2", "thumb:r-f-theirs") == LiveVote.of(theirs)
        assert BAD_RECORDS.labels(FEEDBACK)._value.get() - bad_before == 2
    finally:
        stop.set()
        thread.join(5)
        own.broker.stop()


def test_a_follower_of_an_empty_topic_is_caught_up_at_once():
    own = start_broker()
    stop = threading.Event()
    follower = LedgerFollower(own.kafka, FeedbackLedger())
    thread = threading.Thread(target=follower.run, args=(stop,), daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        assert follower.caught_up.wait(10) and time.monotonic() - started < 5
    finally:
        stop.set()
        thread.join(5)
        own.broker.stop()
