"""A rolling swap across two inference replicas under a steady chat load through the gateway: real
broker, two real vLLM engines (the tiny default model) sharing a swap lease, the real gateway whose
channel lists both replicas (round robin over the ones reporting SERVING), real HTTP clients.

A new version is announced while clients keep chatting. Asserted: no request fails; at every moment
at least one replica reports SERVING (each replica's status is watched on grpc.health.v1, and the
two NOT_SERVING periods never overlap); each replica did leave the rotation once; both end on the
new version, and answers come from it afterwards. Measured (printed, and checked against a loose
bound on this shared 2-core machine): chat p99 while the group swaps against steady state."""

from __future__ import annotations

import itertools
import shutil
import statistics
import threading
import time
from dataclasses import dataclass

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.app import create_app
from services.inference.app import ROUTING_HEALTH_SERVICE
from shared.kafka.publishers import KafkaPublisher
from shared.kafka.topics import POLICY_UPDATES
from shared.pb import inference_pb2, inference_pb2_grpc
from shared.version_line import POLICY, Announcement, VersionLine
from tests.conftest import (
    TEST_API_KEYS,
    LoopThread,
    UvicornThread,
    gateway_config,
    grpc_channel,
    start_broker,
    start_inference,
    test_signing_key,
    test_versions,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 3
"""Concurrent chat clients: a steady load the 2-core machine serves without queueing for long."""
WARM_UP_S = 5.0
"""Load before the steady state is measured (the engines' first requests are slower)."""
STEADY_S = 20.0
"""How long the steady state is measured before the announcement."""
P99_BOUND = 2.0
"""Loose bound on p99(swap) / p99(steady) on this shared machine; the figure itself is printed (the
target on dedicated hardware is 1.2)."""
SEQUENCE = itertools.count(500)


@dataclass
class Reply:
    started: float
    seconds: float
    status: int
    version: str
    tokens: int = 0
    error: str = ""


class ChatLoad:
    """CLIENTS threads sending chat completions through the gateway until stopped."""

    def __init__(self, url: str):
        self.url = url
        self.replies: list[Reply] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _run(self, i: int) -> None:
        headers = {"Authorization": f"Bearer {TEST_API_KEYS['alice']}"}
        body = {
            "model": "rlhf-policy",
            "messages": [{"role": "user", "content": "Count to five, please."}],
            "max_tokens": 12,
            "temperature": 0,
        }
        with httpx.Client(base_url=self.url, headers=headers, timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    r = client.post("/v1/chat/completions", json=body)
                    seconds = time.monotonic() - started
                    if r.status_code == 200:
                        doc = r.json()
                        reply = Reply(started, seconds, 200, doc["policy_version"], doc["usage"]["completion_tokens"])
                    else:
                        reply = Reply(started, seconds, r.status_code, "", error=r.text[:200])
                except httpx.HTTPError as exc:
                    reply = Reply(started, time.monotonic() - started, 0, "", error=repr(exc))
                self.replies.append(reply)


class HealthWatch:
    """Every status change of one replica's routing health service, with the time it was seen."""

    def __init__(self, name: str, address: str):
        self.name = name
        self.changes: list[tuple[float, int]] = []
        self._channel = grpc.insecure_channel(address)
        self._stream = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(service=ROUTING_HEALTH_SERVICE)
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for reply in self._stream:
                self.changes.append((time.monotonic(), reply.status))
        except grpc.RpcError:
            pass  # cancelled at the end

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(5)
        self._channel.close()

    def away(self) -> list[tuple[float, float]]:
        """The periods this replica reported anything but SERVING: (from, to)."""
        periods, since = [], None
        for t, status in self.changes:
            if status != health_pb2.HealthCheckResponse.SERVING and since is None:
                since = t
            elif status == health_pb2.HealthCheckResponse.SERVING and since is not None:
                periods.append((since, t))
                since = None
        if since is not None:
            periods.append((since, float("inf")))
        return periods


def p99(seconds: list[float]) -> float:
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.fixture(scope="module")
def group(policy_store, tmp_path_factory):
    own = start_broker()  # announcements here reach only this module's replicas
    lease_dir = tmp_path_factory.mktemp("swap-lease")
    loops = [LoopThread(), LoopThread()]
    replicas = [
        start_inference(
            loop,
            own.kafka,
            policy_store.root,
            versions=test_versions(copies_dir=tmp_path_factory.mktemp(f"copies-{i}")),
            swap_lease_dir=lease_dir,
            swap_settle_s=1.0,
            swap_drain_timeout_s=30.0,
        )
        for i, loop in enumerate(loops)
    ]
    addresses = ",".join(r.address for r in replicas)
    gateway = UvicornThread(create_app(gateway_config(addresses)))
    yield replicas, gateway, own, policy_store
    gateway.stop()
    for loop, replica in zip(loops, replicas):
        loop.run(replica.stop())
        loop.close()
    own.broker.stop()


def same_weights_as_a_new_version(store, version: str, tmp_path) -> str:
    """``version``'s files published again as the next version (signed): the swap is real, and the
    answers keep their lengths, so latencies before and after compare like with like."""
    copy = tmp_path / "same-weights"
    shutil.copytree(store.path(version), copy, ignore=shutil.ignore_patterns("manifest.*"))
    line = VersionLine(store, POLICY, signer=test_signing_key())
    return line.publish(copy, parent=version, extra={"kind": "test-copy"}, make_current=False).version


def serving(replica) -> str:
    with grpc_channel(replica.address, "gateway") as channel:
        return (
            inference_pb2_grpc.InferenceServiceStub(channel).GetPolicy(inference_pb2.GetPolicyRequest()).policy_version
        )


def test_a_rolling_swap_under_load_fails_no_request_and_never_leaves_the_group_without_a_server(group, tmp_path):
    replicas, gateway, own, store = group
    old = store.first
    new = same_weights_as_a_new_version(store.store, old, tmp_path)
    assert [serving(r) for r in replicas] == [old, old]
    watches = [HealthWatch(f"replica-{i}", r.address) for i, r in enumerate(replicas)]
    load = ChatLoad(gateway.url)
    load.start()
    try:
        time.sleep(WARM_UP_S)
        steady_from = time.monotonic()
        time.sleep(STEADY_S)
        announced_at = time.monotonic()
        signed = Announcement("policy", new, store.store.manifest_sha256(new), "publish", next(SEQUENCE)).signed_by(
            test_signing_key()
        )
        publisher = KafkaPublisher(own.kafka, "test")
        publisher.publish_and_wait(POLICY_UPDATES, POLICY.make_event(signed, None, {}), key="policy")
        publisher.close()
        wait_until(lambda: all(serving(r) == new for r in replicas), 300, "the group did not take the new version")
        wait_until(
            lambda: all(w.changes and w.changes[-1][1] == health_pb2.HealthCheckResponse.SERVING for w in watches),
            30,
            "a replica did not report SERVING again",
        )
        swapped_at = time.monotonic()
        time.sleep(5)  # answers from the new version, after the swap
    finally:
        load.stop()
        for w in watches:
            w.close()

    failed = [r for r in load.replies if r.status != 200]
    assert not failed, f"{len(failed)} of {len(load.replies)} requests failed, e.g. {failed[:3]}"

    away = [w.away() for w in watches]
    assert all(len(periods) == 1 for periods in away), f"each replica leaves the rotation once: {away}"
    (a_from, a_to), (b_from, b_to) = away[0][0], away[1][0]
    assert a_to <= b_from or b_to <= a_from, f"both replicas were away at once: {away}"
    assert all(w.changes[0][1] == health_pb2.HealthCheckResponse.SERVING for w in watches)

    steady = [r.seconds for r in load.replies if steady_from <= r.started < announced_at]
    during = [r.seconds for r in load.replies if announced_at <= r.started < swapped_at]
    after = [r for r in load.replies if r.started > swapped_at + 0.5]
    assert after and {r.version for r in after} == {new}
    assert len({r.tokens for r in load.replies}) == 1, "one prompt, greedy: every answer has the same length"
    assert len(steady) >= 20 and len(during) >= 10
    ratio = p99(during) / p99(steady)
    print(
        f"\nrolling swap: {len(load.replies)} requests, 0 failed; steady p50 {statistics.median(steady):.3f} s "
        f"p99 {p99(steady):.3f} s (n={len(steady)}); during the swap ({swapped_at - announced_at:.1f} s) "
        f"p50 {statistics.median(during):.3f} s p99 {p99(during):.3f} s (n={len(during)}); "
        f"p99 ratio {ratio:.2f}; {load.replies[0].tokens} tokens per answer; "
        f"away: {[round(t - f, 2) for f, t in (away[0][0], away[1][0])]} s"
    )
    assert ratio < P99_BOUND
