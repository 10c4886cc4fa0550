"""Restart-safe state, with real parts: the trainer's checkpoints belong to their model store (one of
store A never restarts a trainer on store B: it starts cleanly instead), readers tell a recreated
topic by its identity (the memory-only broker restarted on the same port, the new topic grown past
the stored offset: nothing is skipped), and the reward learner's state takes the new topic's votes
as the newer ones although the feedback service numbered them from 1 again."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid

import pytest
from kafka import KafkaProducer

from shared.config import ModelStoreConfig, load_config
from shared.events import FeedbackEvent, RatedResponse
from shared.kafka import envelope
from shared.kafka.embedded import free_port
from shared.kafka.readers import AssignedReader, Record
from shared.kafka.topics import COMPLETIONS, FEEDBACK
from shared.model_store import ModelStore
from tests.conftest import start_broker

pytestmark = pytest.mark.integration


# --- checkpoints and the model store -------------------------------------------------------------


def store_with_models(policy_store, root):
    """A store of its own: a copy of the default policy-0001 and an RM made from it (rm-0001)."""
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from shared.models.reward_model import RewardModel

    store = ModelStore(root)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "policy"
        shutil.copytree(policy_store.store.path(policy_store.first), copy, ignore=shutil.ignore_patterns("manifest.*"))
        store.publish("policy", copy)
    policy_dir = store.path("policy-0001")
    with tempfile.TemporaryDirectory() as tmp:
        RewardModel.from_policy_dir(policy_dir, seed=0).save(Path(tmp), AutoTokenizer.from_pretrained(str(policy_dir)))
        store.publish("rm", Path(tmp), parent="policy-0001")
    return store


def trainer_app(store, checkpoint_dir=None):
    from services.trainer.app import TrainerApp
    from services.trainer.config import TrainerConfig

    overrides = {"checkpoint_dir": checkpoint_dir} if checkpoint_dir is not None else {}
    cfg = load_config(
        TrainerConfig,
        {},
        grpc_port=0,
        metrics_port=0,
        model_store=ModelStoreConfig(root=store.root),
        live_prompt_fraction=0.0,
        **overrides,
    )

    async def build() -> TrainerApp:  # its gRPC server is asyncio's: built inside a loop of its own
        return TrainerApp(cfg)

    return asyncio.run(build())


def test_a_checkpoint_of_store_a_never_restarts_a_trainer_on_store_b(policy_store, tmp_path, caplog):
    from services.trainer.loop import checkpoint_payload

    shared_dir = tmp_path / "var-trainer-checkpoints"  # one directory beside the checkout, as before
    store_a = store_with_models(policy_store, tmp_path / "a")
    app_a = trainer_app(store_a, shared_dir)
    learner, state = app_a._load_or_start()
    state.lineage.append("policy-0004")  # store A's trainer went on to publish policy-0004
    state.step = 40
    app_a.checkpoints.save(state.step, checkpoint_payload(learner, state))
    manifest = json.loads((app_a.checkpoints.path(40) / "manifest.json").read_text())
    assert manifest["store_id"] == (store_a.root / "store-id").read_text().strip()

    store_b = store_with_models(policy_store, tmp_path / "b")
    app_b = trainer_app(store_b, shared_dir)
    with caplog.at_level("WARNING"):
        learner_b, state_b = app_b._load_or_start()  # no traceback: a clean fresh start
    assert state_b.step == 0 and state_b.lineage == ["policy-0001"] and learner_b.weights_version == "policy-0001"
    assert "belongs to model store" in caplog.text and "does not resume from it" in caplog.text
    assert app_b.checkpoints.steps() == [], "A's checkpoint is set aside, not resumed and not pruned in B's place"
    assert len(list((shared_dir / ".set-aside").iterdir())) == 1


def test_an_unstamped_checkpoint_naming_a_missing_version_starts_fresh(policy_store, tmp_path, caplog):
    """The issue's case: a checkpoint from before store ids, naming policy-0004, which the store lacks."""
    from services.trainer.checkpoint import CheckpointStore
    from services.trainer.loop import checkpoint_payload

    store = store_with_models(policy_store, tmp_path / "store")
    app = trainer_app(store)
    assert app.checkpoints.root == store.root / ".state" / "trainer" / "checkpoints", "by default inside the store"
    learner, state = app._load_or_start()
    state.lineage.append("policy-0004")
    CheckpointStore(app.checkpoints.root).save(7, checkpoint_payload(learner, state))  # no store id in it

    again = trainer_app(store)
    with caplog.at_level("WARNING"):
        _, fresh = again._load_or_start()
    assert fresh.step == 0 and fresh.lineage == ["policy-0001"]
    assert "policy-0004, which the model store does not have" in caplog.text


# --- recreated topics ------------------------------------------------------------------------------


def rating(fid: str, revision: int, order=("x", "y")) -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=fid,
        kind="ranking",
        user_id="u1",
        target="ranking:x,y",
        revision=revision,
        supersedes=None,
        responses=[RatedResponse(i, "policy-0001", "p") for i in order],
        received_at=time.time(),
    )


def produce(kafka, topic: str, events) -> None:
    producer = KafkaProducer(bootstrap_servers=kafka.servers)
    for ev in events:
        producer.send(topic, key=b"u1", value=envelope.encode(envelope.wrap(ev, "test")), partition=0).get(10)
    producer.close()


def read_until(reader: AssignedReader, n: int, timeout_s: float = 30.0) -> list[Record]:
    got: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += reader.poll()
    return got


def test_a_recreated_topic_grown_past_the_stored_offset_is_read_from_its_start(caplog):
    port = free_port()
    first = start_broker(port)
    try:
        produce(first.kafka, FEEDBACK, [rating(f"old-{n}", 1) for n in range(10)])
        reader = AssignedReader(first.kafka, "test", [FEEDBACK], start="beginning", identity_check_s=0)
        assert len(read_until(reader, 10)) == 10
        stored = {(FEEDBACK, p): 10 if p == 0 else 0 for p in range(3)}
        identities = reader.identities
        reader.close()
    finally:
        first.broker.stop()

    second = start_broker(port)  # memory-only: every topic is new, at offset 0
    try:
        produce(second.kafka, FEEDBACK, [rating(f"new-{n}", 1) for n in range(15)])  # past offset 10
        assert reader_identity_changed(second.kafka, identities)
        legacy = AssignedReader(second.kafka, "test", [FEEDBACK], start=stored, identity_check_s=0)
        skipped = read_until(legacy, 15, timeout_s=3)
        legacy.close()
        assert len(skipped) == 5, "by offsets alone the new topic looks intact: 10 records would be skipped"

        with caplog.at_level("WARNING"):
            resumed = AssignedReader(
                second.kafka, "test", [FEEDBACK], start=stored, identities=identities, identity_check_s=0
            )
            got = read_until(resumed, 15)
        resumed.close()
        ids = [envelope.decode(r.value).payload.feedback_id for r in got]
        assert ids == [f"new-{n}" for n in range(15)], "nothing skipped, nothing of the old topic"
        assert "recreated" in caplog.text
    finally:
        second.broker.stop()


def reader_identity_changed(kafka, before) -> bool:
    now = AssignedReader(kafka, "test", [FEEDBACK], start="end", identity_check_s=0)
    try:
        return now.identities[(FEEDBACK, 0)] != before[(FEEDBACK, 0)]
    finally:
        now.close()


def test_the_learner_follows_a_topic_recreated_while_it_runs(tmp_path):
    """The reward learner's feed and state across a broker restart: the feedback service numbers the
    user's changed vote 1 again on the new topic, below the 3 the learner stored; the new topic grows
    past the stored offset before the learner notices. The changed vote wins, nothing is skipped."""
    from services.reward.ratings_feed import RatingsFeed
    from services.reward.retraining_state import RetrainingState

    state = RetrainingState(tmp_path / "learner.sqlite3", store_id=uuid.uuid4().hex)

    def ingest(payloads, offsets):
        state.ingest([p for p in payloads if isinstance(p, FeedbackEvent)], [], offsets, now=time.time())

    port = free_port()
    first = start_broker(port)
    feed = None
    try:
        produce(first.kafka, FEEDBACK, [rating("v1", 1), rating("v2", 2), rating("v3", 3)])
        produce(first.kafka, FEEDBACK, [rating(f"pad-{n}", 0) for n in range(7)])  # revision 0: never live
        feed = RatingsFeed(
            first.kafka,
            state.offsets(),
            topics=(FEEDBACK, COMPLETIONS),
            identities=state.identities(),
            adopt_identities=state.adopt_identities,
            identity_check_s=0.5,
        )
        deadline = time.monotonic() + 30
        while state.offsets().get((FEEDBACK, 0), 0) < 10 and time.monotonic() < deadline:
            feed.poll(ingest)
        assert [v.event.feedback_id for v in state.live_votes()] == ["v3"]
        first.broker.stop()

        second = start_broker(port)
        try:
            changed = rating("changed", 1, order=("y", "x"))  # the feedback service starts again at 1
            produce(second.kafka, FEEDBACK, [changed] + [rating(f"more-{n}", 0) for n in range(14)])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    feed.poll(ingest)
                except Exception:  # noqa: BLE001 - the batch is read again, as RetrainingThread does
                    time.sleep(0.2)
                if state.offsets().get((FEEDBACK, 0), 0) >= 15 and state.vote_epoch == 1:
                    break
            assert state.vote_epoch == 1, "the recreated feedback topic started a new vote epoch"
            assert [v.event.feedback_id for v in state.live_votes()] == ["changed"]
            assert state.offsets()[(FEEDBACK, 0)] == 15
        finally:
            second.broker.stop()
    finally:
        if feed is not None:
            feed.close()
        state.close()
