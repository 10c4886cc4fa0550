"""Users before rollouts in the engine: with vLLM's priority scheduling, a user's request that
arrives behind a full batch of trainer rollouts and a queue of more is given the next free slot,
ahead of every rollout queued before it. Real vLLM engine (two sequences at a time), real gRPC on
loopback, the trainer's and the gateway's own identities."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import REGISTRY

from shared.pb import common_pb2, inference_pb2, inference_pb2_grpc
from tests.conftest import LoopThread, grpc_channel, start_inference, test_versions, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLOTS = 2
"""The engine's max_num_seqs: two rollouts fill its batch."""
QUEUED = 6
"""Rollouts waiting behind the full batch when the user's request arrives."""
ROLLOUT_TOKENS = 200
"""Greedy on the test policy: never an early end, so a slot frees only after this many tokens."""
PROMPT = [common_pb2.ChatMessage(role="user", content="What is 9 plus 4?")]


@pytest.fixture(scope="module")
def engine(broker, policy_store, tmp_path_factory):
    loop = LoopThread()
    app = start_inference(
        loop,
        broker.kafka,
        policy_store.root,
        versions=test_versions(copies_dir=tmp_path_factory.mktemp("priority-copies")),
        follow_updates=False,
        max_num_seqs=SLOTS,
    )
    assert app.serving.cfg.priority_scheduling, "on by default"
    trainer = grpc_channel(app.address, "trainer")
    gateway = grpc_channel(app.address, "gateway")
    yield inference_pb2_grpc.InferenceServiceStub(trainer), inference_pb2_grpc.InferenceServiceStub(gateway)
    trainer.close()
    gateway.close()
    loop.run(app.stop())
    loop.close()


class TimedStream(threading.Thread):
    """One streamed request in a thread: when it was sent, when its first token came, how many came."""

    def __init__(self, stub, source: str, max_tokens: int):
        super().__init__(daemon=True)
        self.request = inference_pb2.GenerateRequest(
            messages=PROMPT,
            sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=max_tokens),
            source=source,
        )
        self.stub = stub
        self.sent: float | None = None
        self.first: float | None = None
        self.tokens = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.sent = time.monotonic()
            for chunk in self.stub.GenerateStream(self.request, timeout=300):
                if chunk.token_ids and self.first is None:
                    self.first = time.monotonic()
                self.tokens += len(chunk.token_ids)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def admitted(priority_class: str) -> float:
    sample = REGISTRY.get_sample_value
    return sample("rlhf_inference_requests_by_priority_total", {"priority_class": priority_class}) or 0.0


def test_a_user_request_behind_a_full_batch_of_rollouts_starts_before_the_queued_rollouts(engine):
    trainer, gateway = engine
    users_before, rollouts_before = admitted("user"), admitted("trainer")
    rollouts = [TimedStream(trainer, "trainer", ROLLOUT_TOKENS) for _ in range(SLOTS + QUEUED)]
    for r in rollouts:
        r.start()
    wait_until(lambda: sum(r.first is not None for r in rollouts) >= SLOTS, 120, "no rollout started")
    time.sleep(0.3)  # every rollout has reached the engine by now; the batch stays full
    running = [r for r in rollouts if r.first is not None]
    queued = [r for r in rollouts if r.first is None]
    assert len(running) == SLOTS and len(queued) == QUEUED, "max_num_seqs rollouts run, the rest wait"
    assert all(r.tokens < ROLLOUT_TOKENS for r in running), "the batch must still be full when the user comes"
    user = TimedStream(gateway, "user", 16)
    user.start()
    for t in (user, *rollouts):
        t.join(300)
    assert not any(t.is_alive() for t in (user, *rollouts)), "a request did not finish"
    errors = [t.error for t in (user, *rollouts) if t.error is not None]
    assert not errors, errors[:2]
    assert all(r.tokens == ROLLOUT_TOKENS for r in rollouts), "a rollout ended early: a slot freed too soon"
    assert user.tokens > 0 and user.first is not None
    first_queued = min(r.first for r in queued)
    assert user.first < first_queued, (
        f"the user's first token came {user.first - first_queued:.3f} s after the first queued rollout's; "
        f"{sum(r.first < user.first for r in queued)} of {QUEUED} queued rollouts started before it"
    )
    user_wait = user.first - user.sent
    queued_waits = sorted(r.first - r.sent for r in queued)
    print(
        f"\npriority: user TTFT {user_wait:.3f} s behind a full batch; queued rollouts' TTFT "
        f"{queued_waits[0]:.3f}..{queued_waits[-1]:.3f} s"
    )
    assert admitted("user") == users_before + 1 and admitted("trainer") == rollouts_before + SLOTS + QUEUED
