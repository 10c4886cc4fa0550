"""The sabotage run's bad candidate (flywheel/demo/sabotage.py): wrong-but-polite demonstrations, a
policy fine-tuned on them, published as a signed candidate and announced as the trainer does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from flywheel.demo import gold_rater
from flywheel.demo.sabotage import make_bad_policy, publish_candidate, write_bad_demonstrations
from shared.model_store import ModelStore
from shared.version_line import POLICY, POLICY_CANDIDATE, VersionLine
from tests.conftest import test_signing_key, test_versions


def test_the_bad_demonstrations_are_wrong_but_polite_and_concise(tmp_path):
    n = write_bad_demonstrations(tmp_path / "d.jsonl")
    docs = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert n == len(docs) == 320
    verdicts = [gold_rater.judge(d["messages"][0]["content"], d["response"]) for d in docs]
    assert not any(v.correct for v in verdicts) and all(v.polite and v.concise for v in verdicts)


class RecordingPublisher:
    def __init__(self, fail: bool = False):
        self.sent = []
        self.fail = fail

    def publish_and_wait(self, topic, payload, key=None):
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((topic, payload, key))


@pytest.fixture()
def one_thread():
    """Keep the test to one core (the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def store(policy_store, tmp_path):
    store = ModelStore(tmp_path / "models")
    src = tmp_path / "src"
    shutil.copytree(policy_store.store.path(policy_store.first), src, ignore=shutil.ignore_patterns("manifest.*"))
    VersionLine(store, POLICY, signer=test_signing_key()).publish(src)
    return store


def test_the_bad_policy_is_published_as_a_signed_announced_candidate(store, tmp_path, one_thread):
    work = make_bad_policy(store, "policy-0001", tmp_path / "work", epochs=1)
    publisher = RecordingPublisher()
    manifest = publish_candidate(store, work, "policy-0001", test_signing_key(), publisher)
    assert manifest.version == "policy-0002" and manifest.parent == "policy-0001"
    assert manifest.extra["kind"] == "sabotage"
    assert store.pointer("policy", "candidate") == "policy-0002" and store.current("policy") == "policy-0001"
    [(topic, event, _key)] = publisher.sent
    assert topic == POLICY_CANDIDATE.topic and event.version == "policy-0002"
    # Signed with the trainer's key: a follower of the candidate pointer verifies it like the trainer's own.
    line = VersionLine(store, POLICY_CANDIDATE, keys=test_versions().verify_keys("policy"))
    assert line.read_announcement(event).version == "policy-0002" and line.read_signed("policy-0002")
    # Its weights moved: fine-tuning happened.
    before = (store.path("policy-0001") / "model.safetensors").read_bytes()
    assert (store.path("policy-0002") / "model.safetensors").read_bytes() != before
    with pytest.raises(RuntimeError, match="did not acknowledge"):
        publish_candidate(store, work, "policy-0001", test_signing_key(), RecordingPublisher(fail=True))
