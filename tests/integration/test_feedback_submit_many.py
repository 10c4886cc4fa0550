"""FeedbackServing.submit_many on a real broker: a batch's free ratings are written together, a
rating whose (user, target) is busy waits for the earlier vote and supersedes it, refusals and
retries keep their own outcomes, and every accepted rating is on rlhf.feedback exactly once."""

import asyncio
import time
import uuid

import pytest

from services.feedback.config import FeedbackConfig
from services.feedback.domain import Submission, SubmitResult
from services.feedback.ledger import FeedbackLedger
from services.feedback.serving import FeedbackServing
from shared.config import FeedbackTokenConfig, load_config
from shared.errors import InvalidArgument, RlhfError
from shared.feedback_token import TokenClaims, sign
from shared.kafka.publishers import KafkaPublisher, Outbox, RdKafkaPublisher
from shared.kafka.topics import FEEDBACK
from tests.conftest import consume_events

pytestmark = pytest.mark.integration

SECRET = "s" * 32


def thumb(user: str, rid: str, value: str = "up", key: str = "") -> Submission:
    token = sign(SECRET, TokenClaims(rid, "policy-0001", "p1", int(time.time()) + 60, principal=user))
    return Submission("thumb", [rid], [token], user, thumb=value, idempotency_key=key)


def test_a_batch_keeps_each_ratings_outcome_and_orders_votes_on_one_target(broker):
    run = uuid.uuid4().hex[:8]
    u1, u2, r1, r2 = f"u1-{run}", f"u2-{run}", f"r1-{run}", f"r2-{run}"
    batch = [
        thumb(u1, r1, "up"),
        thumb(u1, r1, "down"),
        thumb(u2, r2, "sideways"),
        thumb(u2, r2, key="k"),
        thumb(u2, r2, key="k"),
    ]

    async def scenario():
        cfg = load_config(FeedbackConfig, {}, kafka=broker.kafka, token=FeedbackTokenConfig(secret=SECRET))
        publisher, dlq = RdKafkaPublisher(broker.kafka, "test"), Outbox(KafkaPublisher(broker.kafka, "test"))
        serving = FeedbackServing(cfg, publisher, dlq, FeedbackLedger())
        try:
            outcomes = await serving.submit_many([(s, lambda: "raw") for s in batch])
            again = await serving.submit_many([(thumb(u1, r1, "down"), lambda: "raw")])
            return outcomes, again, len(serving._locks)
        finally:
            publisher.close()
            dlq.close(5)

    outcomes, again, held = asyncio.run(scenario())
    up, down, bad, keyed, retry = outcomes
    assert isinstance(up, SubmitResult) and up.revision == 1 and not up.duplicate
    assert isinstance(down, SubmitResult) and down.revision == 2, "the second vote on r1 supersedes the first"
    assert isinstance(bad, InvalidArgument) and bad.param == "thumb"
    assert isinstance(keyed, SubmitResult) and not keyed.duplicate
    assert isinstance(retry, SubmitResult) and retry.duplicate and retry.feedback_id == keyed.feedback_id
    assert again == [SubmitResult(down.feedback_id, 2, duplicate=True)], "an unchanged vote is not written again"
    assert held == 0 and not any(type(o) is RlhfError for o in outcomes)

    # Asks for one more than expected: a record written twice would be found within the timeout.
    events = consume_events(broker.kafka, FEEDBACK, lambda e: e.payload.user_id in (u1, u2), count=4, timeout=3)
    by_id = {e.payload.feedback_id: e.payload for e in events}
    assert len(events) == 3 and set(by_id) == {up.feedback_id, down.feedback_id, keyed.feedback_id}
    assert by_id[down.feedback_id].supersedes == up.feedback_id and by_id[down.feedback_id].thumb == "down"
