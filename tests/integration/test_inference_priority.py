"""Users before rollouts in the engine: with vLLM's priority scheduling, a user's request that
arrives behind a full batch of trainer rollouts and a queue of more is given the next free slot,
ahead of every rollout queued before it. Real vLLM engine (two sequences at a time), real gRPC on
loopback, the trainer's and the gateway's own identities."""

from __future__ import annotations

import statistics
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
ROLLOUT_TOKENS = 700
"""Greedy on the test policy: never an early end, so a slot frees only after this many tokens (long
enough that the batch is still full when the user's request arrives, on a warm engine)."""
STAGGER = 128
"""The running rollouts end this many tokens apart: one slot frees at a time, and the first goes to
the user (first come, first served would give it to the first queued rollout)."""
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
        max_model_len=1024,
        max_tokens_limit=768,
    )
    assert app.serving.cfg.priority_scheduling, "on by default"
    trainer = grpc_channel(app.address, "trainer")
    gateway = grpc_channel(app.address, "gateway")
    stubs = inference_pb2_grpc.InferenceServiceStub(trainer), inference_pb2_grpc.InferenceServiceStub(gateway)
    warm = [TimedStream(stubs[0], "trainer", ROLLOUT_TOKENS) for _ in range(SLOTS)]  # first steps are slow
    for w in warm:
        w.start()
    for w in warm:
        w.join(300)
    yield app, *stubs
    trainer.close()
    gateway.close()
    loop.run(app.stop())
    loop.close()


class TimedStream(threading.Thread):
    """One streamed request in a thread: when it was sent, when its first token came, how many came."""

    def __init__(self, stub, source: str, max_tokens: int):
        super().__init__(daemon=True)
        self.max_tokens = max_tokens
        self.request = inference_pb2.GenerateRequest(
            messages=PROMPT,
            sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=max_tokens),
            source=source,
        )
        self.stub = stub
        self.sent: float | None = None
        self.first: float | None = None
        self.done: float | None = None
        self.tokens = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.sent = time.monotonic()
            for chunk in self.stub.GenerateStream(self.request, timeout=300):
                if chunk.token_ids and self.first is None:
                    self.first = time.monotonic()
                self.tokens += len(chunk.token_ids)
            self.done = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def admitted(priority_class: str) -> float:
    sample = REGISTRY.get_sample_value
    return sample("rlhf_inference_requests_by_priority_total", {"priority_class": priority_class}) or 0.0


def test_a_user_request_behind_a_full_batch_of_rollouts_starts_before_the_queued_rollouts(engine):
    app, trainer, gateway = engine
    users_before, rollouts_before = admitted("user"), admitted("trainer")
    running = [TimedStream(trainer, "trainer", ROLLOUT_TOKENS - i * STAGGER) for i in range(SLOTS)]
    for r in running:
        r.start()
    wait_until(lambda: all(r.first is not None for r in running), 60, "the first rollouts did not start")
    queued = [TimedStream(trainer, "trainer", ROLLOUT_TOKENS) for _ in range(QUEUED)]
    for r in queued:
        r.start()
    rollouts = [*running, *queued]
    wait_until(lambda: app.serving.gate.in_flight == SLOTS + QUEUED, 60, "the rollouts were not all admitted")
    time.sleep(0.05)  # the last one admitted has reached the engine's queue
    assert all(r.first is None for r in queued), "max_num_seqs rollouts run, the rest wait"
    assert all(r.tokens < r.max_tokens for r in running), "the batch must still be full when the user comes"
    user = TimedStream(gateway, "user", 16)
    user.start()
    for t in (user, *rollouts):
        t.join(300)
    assert not any(t.is_alive() for t in (user, *rollouts)), "a request did not finish"
    errors = [t.error for t in (user, *rollouts) if t.error is not None]
    assert not errors, errors[:2]
    assert all(r.tokens == r.max_tokens for r in rollouts), "a rollout ended early: a slot freed too soon"
    assert user.tokens > 0 and user.first is not None
    first_queued = min(r.first for r in queued)
    assert user.first < first_queued, (
        f"the user's first token came {user.first - first_queued:.3f} s after the first queued rollout's; "
        f"{sum(r.first < user.first for r in queued)} of {QUEUED} queued rollouts started before it"
    )
    user_wait = user.first - user.sent
    queued_waits = sorted(r.first - r.sent for r in queued)
    rollout_s = statistics.median(r.done - r.first for r in queued)
    print(
        f"\npriority: user TTFT {user_wait:.3f} s behind a full batch; queued rollouts' TTFT "
        f"{queued_waits[0]:.3f}..{queued_waits[-1]:.3f} s; a rollout of {ROLLOUT_TOKENS} tokens takes "
        f"{rollout_s:.3f} s"
    )
    assert admitted("user") == users_before + 1 and admitted("trainer") == rollouts_before + SLOTS + QUEUED
