"""The inference outbox against the real broker: completion events accepted by a process killed with
SIGKILL are on rlhf.completions once a new outbox opens the same spill journal, and a record the
broker can never take (larger than a produce request may be) is moved aside while the ones after it
are delivered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shared.events import CompletionEvent, Message, Timings
from shared.kafka.embedded import free_port
from shared.kafka.metrics import OUTBOX_MOVED_ASIDE
from shared.kafka.publishers import KafkaPublisher, Outbox
from shared.kafka.readers import AssignedReader, decode_or_skip
from shared.kafka.spill import ASIDE_NAME, decode
from shared.kafka.topics import COMPLETIONS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def completion(request_id: str, n: int, text: str = "an answer") -> CompletionEvent:
    return CompletionEvent(
        request_id=request_id,
        response_id=f"{request_id}-{n}",
        index=0,
        n=1,
        policy_version="policy-0001",
        model="rlhf-policy",
        source="user",
        messages=[Message("user", "hello")],
        prompt_token_ids=[1, 2, 3],
        completion_text=text,
        token_ids=[4, 5],
        logprobs=[-0.1, -0.2],
        finish_reason="stop",
        sampling={"temperature": 1.0},
        timings=Timings(queued_s=0.0, first_token_s=0.01, total_s=0.02),
        created_at=time.time(),
    )


def response_ids(kafka, prefix: str, want: int, timeout_s: float = 30.0) -> list[str]:
    """Response ids starting with ``prefix`` on rlhf.completions, in the order read (duplicates kept)."""
    reader = AssignedReader(kafka, "test", [COMPLETIONS], start="beginning")
    out: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(set(out)) < want and time.monotonic() < deadline:
            for record in reader.poll():
                env = decode_or_skip(record)
                if env is not None and env.payload.response_id.startswith(prefix):
                    out.append(env.payload.response_id)
    finally:
        reader.close()
    return out


CHILD = """
import sys, time
from pathlib import Path
from shared.config import KafkaConfig
from shared.kafka.publishers import KafkaPublisher, Outbox
from shared.kafka.topics import COMPLETIONS
from tests.integration.test_outbox_spill import completion

# A broker nobody answers at: nothing is acknowledged, everything stays in the journal.
kafka = KafkaConfig(bootstrap_servers=sys.argv[2], delivery_timeout_s=2.0, request_timeout_ms=1000)
outbox = Outbox(KafkaPublisher(kafka, "inference"), spill_dir=Path(sys.argv[1]), max_backoff_s=0.2)
for n in range(int(sys.argv[4])):
    outbox.publish(COMPLETIONS, completion(sys.argv[3], n), key=sys.argv[3])
print("accepted", flush=True)
time.sleep(600)
"""


def test_events_accepted_by_a_killed_process_reach_the_topic_from_its_spill_journal(broker, tmp_path):
    spill, prefix, count = tmp_path / "outbox-50051", f"req-{uuid.uuid4().hex}", 100
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(spill), f"127.0.0.1:{free_port()}", prefix, str(count)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "accepted"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    outbox = Outbox(KafkaPublisher(broker.kafka, "inference"), spill_dir=spill, max_backoff_s=0.2)
    assert outbox.replayed == count
    assert outbox.flush(60), "the replayed events were not acknowledged"
    outbox.close()
    got = response_ids(broker.kafka, prefix, count)
    assert sorted(set(got)) == sorted(f"{prefix}-{n}" for n in range(count))
    assert len(got) == count  # nothing had reached Kafka before the kill: each exactly once
    assert not spill.exists()  # everything acknowledged: the journal is gone


def test_an_event_the_broker_can_never_take_is_moved_aside_and_the_later_ones_delivered(broker, tmp_path):
    before = OUTBOX_MOVED_ASIDE.labels(COMPLETIONS)._value.get()
    prefix = f"req-{uuid.uuid4().hex}"
    outbox = Outbox(
        KafkaPublisher(broker.kafka, "inference"), spill_dir=tmp_path / "spill", max_attempts=2, max_backoff_s=0.05
    )
    outbox.publish(COMPLETIONS, completion(prefix, 0), key=prefix)
    outbox.publish(COMPLETIONS, completion(prefix, 1, text="x" * (2 << 20)), key=prefix)  # over a produce request
    outbox.publish(COMPLETIONS, completion(prefix, 2), key=prefix)
    outbox.publish(COMPLETIONS, completion(prefix, 3), key=prefix)
    assert outbox.flush(60)
    outbox.close()
    assert sorted(set(response_ids(broker.kafka, prefix, 3))) == [f"{prefix}-0", f"{prefix}-2", f"{prefix}-3"]
    assert OUTBOX_MOVED_ASIDE.labels(COMPLETIONS)._value.get() == before + 1
    aside = decode((tmp_path / "spill" / ASIDE_NAME).read_bytes()[8:])
    assert aside.topic == COMPLETIONS and len(aside.value) > 2 << 20  # kept for an operator, whole
