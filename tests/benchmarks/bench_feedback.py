"""Ratings per second through the feedback path, side by side in one run.

    .venv/bin/python tests/benchmarks/bench_feedback.py [--ratings 4000] [--concurrency 8,64]

Three ways of storing the same thumbs-up ratings with acks=all, each against the same embedded
broker, in one run (ratios hold on a noisy machine, absolute figures do not):

  http   POST /v1/feedback on the gateway -> gRPC -> feedback service -> Kafka (the product path)
  grpc   SubmitFeedback straight to the feedback service (no HTTP hop)
  kafka  kafka-python producer, acks=all, the same event bytes (the floor: no checks at all)

Every rating is a new vote (its own user and response), with a feedback token signed by this
script playing the gateway's part. After each run the topic is read back: accepted must equal the
records on rlhf.feedback, with no id twice. Prints a table, writes JSON and a PNG next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from shared.config import KafkaConfig  # noqa: E402
from shared.events import FeedbackEvent, RatedResponse  # noqa: E402
from shared.feedback_token import TokenClaims, sign  # noqa: E402
from shared.kafka import envelope  # noqa: E402
from shared.kafka.admin import ensure_topics  # noqa: E402
from shared.kafka.client import producer_kwargs  # noqa: E402
from shared.kafka.embedded import EmbeddedBroker, free_port  # noqa: E402
from shared.kafka.envelope import decode  # noqa: E402
from shared.kafka.topics import FEEDBACK  # noqa: E402
from shared.launcher import grpc_serving  # noqa: E402
from shared.pb import feedback_pb2, feedback_pb2_grpc  # noqa: E402

SECRET = "bench-feedback-token-secret-0123456789"


def log(msg: str) -> None:
    print(f"[bench-feedback {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def token(rid: str) -> str:
    return sign(SECRET, TokenClaims(rid, "policy-0001", "ph-bench", int(time.time()) + 3600))


def wait_for(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up")
        time.sleep(0.2)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Services:
    """Broker, feedback service and gateway as separate processes, as `rlhf up` runs them."""

    def __init__(self) -> None:
        self.broker = EmbeddedBroker().start()
        self.kafka = KafkaConfig(bootstrap_servers=self.broker.bootstrap_servers)
        ensure_topics(self.kafka)
        self.feedback_port, self.gateway_port = free_port(), free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "RLHF_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
               "RLHF_FEEDBACK_TOKEN_SECRET": SECRET, "RLHF_LOG_LEVEL": "WARNING",
               "RLHF_FEEDBACK_GRPC_PORT": str(self.feedback_port), "RLHF_FEEDBACK_METRICS_PORT": "0",
               "RLHF_GATEWAY_PORT": str(self.gateway_port),
               "RLHF_GATEWAY_FEEDBACK_ADDRESS": f"127.0.0.1:{self.feedback_port}"}
        self.procs = [subprocess.Popen([sys.executable, "-m", m], env=env, cwd=REPO, start_new_session=True)
                      for m in ("services.feedback", "services.gateway")]
        wait_for(grpc_serving(f"127.0.0.1:{self.feedback_port}"), "feedback service")
        wait_for(lambda: port_open(self.gateway_port), "gateway")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        self.broker.stop()


async def run_http(svc: Services, prefix: str, n: int, concurrency: int) -> list[tuple[float, bool]]:
    # aiohttp, not httpx: httpx's connection pool costs several times more CPU per request at high
    # concurrency, and the load generator shares the 2 cores with the servers it measures.
    import aiohttp

    url = f"http://127.0.0.1:{svc.gateway_port}/v1/feedback"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def one(i: int) -> tuple[float, bool]:
            rid = f"{prefix}-r{i}"
            body = {"type": "thumb", "response_id": rid, "thumb": "up", "user": f"{prefix}-u{i}",
                    "feedback_tokens": [token(rid)]}
            t = time.perf_counter()
            async with client.post(url, json=body) as r:
                await r.read()
                ok = r.status == 200
            return time.perf_counter() - t, ok
        return await closed_loop(one, n, concurrency)


async def run_grpc(svc: Services, prefix: str, n: int, concurrency: int) -> list[tuple[float, bool]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.feedback_port}") as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)

        async def one(i: int) -> tuple[float, bool]:
            rid = f"{prefix}-r{i}"
            req = feedback_pb2.SubmitFeedbackRequest(
                thumb=feedback_pb2.ThumbRating(response_id=rid, thumb=feedback_pb2.THUMB_UP),
                feedback_tokens=[token(rid)], user_id=f"{prefix}-u{i}")
            t = time.perf_counter()
            try:
                await stub.SubmitFeedback(req, timeout=60)
                ok = True
            except grpc.aio.AioRpcError:
                ok = False
            return time.perf_counter() - t, ok
        return await closed_loop(one, n, concurrency)


async def run_kafka(svc: Services, prefix: str, n: int, concurrency: int) -> list[tuple[float, bool]]:
    producer = KafkaProducer(**producer_kwargs(svc.kafka, "bench"))
    loop = asyncio.get_running_loop()

    async def one(i: int) -> tuple[float, bool]:
        rid = f"{prefix}-r{i}"
        ev = FeedbackEvent(feedback_id=f"{prefix}-f{i}", kind="thumb", user_id=f"{prefix}-u{i}", target=f"thumb:{rid}",
                           revision=1, supersedes=None, responses=[RatedResponse(rid, "policy-0001", "ph-bench")],
                           thumb="up", received_at=time.time())
        value = envelope.encode(envelope.wrap(ev, "bench"))
        done = loop.create_future()
        t = time.perf_counter()
        fut = producer.send(FEEDBACK, key=ev.user_id.encode(), value=value)
        fut.add_callback(lambda _: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(True)))
        fut.add_errback(lambda _: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(False)))
        ok = await done
        return time.perf_counter() - t, ok

    try:
        return await closed_loop(one, n, concurrency)
    finally:
        producer.close(timeout=10)


async def closed_loop(one, n: int, concurrency: int) -> list[tuple[float, bool]]:
    """``concurrency`` clients, each sending its next rating as soon as the last is answered."""
    results: list[tuple[float, bool]] = []
    next_i = 0
    started = time.perf_counter()

    async def client() -> None:
        nonlocal next_i
        while next_i < n:
            i, next_i = next_i, next_i + 1
            results.append(await one(i))
            if len(results) % max(1, n // 4) == 0:
                log(f"  {len(results)}/{n} done, {len(results) / (time.perf_counter() - started):.0f}/s")

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def records_on_topic(kafka: KafkaConfig, prefix: str) -> tuple[int, int]:
    """(records whose user starts with prefix, distinct feedback ids among them)."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.servers, enable_auto_commit=False)
    parts = [TopicPartition(FEEDBACK, p) for p in consumer.partitions_for_topic(FEEDBACK)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    end = consumer.end_offsets(parts)
    count, ids = 0, set()
    while any(consumer.position(tp) < end[tp] for tp in parts):
        for records in consumer.poll(timeout_ms=500).values():
            for r in records:
                p = decode(r.value).payload
                if p.user_id.startswith(prefix + "-"):
                    count += 1
                    ids.add(p.feedback_id)
    consumer.close()
    return count, len(ids)


def summarise(path: str, concurrency: int, results, wall: float, on_topic: tuple[int, int]) -> dict:
    lat = sorted(t for t, ok in results if ok)
    accepted = len(lat)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"path": path, "concurrency": concurrency, "sent": len(results), "accepted": accepted,
            "errors": len(results) - accepted, "ratings_per_s": accepted / wall, "p50_ms": q[49] * 1e3,
            "p99_ms": q[98] * 1e3, "records_on_topic": on_topic[0], "distinct_ids_on_topic": on_topic[1],
            "lost": accepted - on_topic[1], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", type=int, default=4000, help="ratings per path and concurrency level")
    ap.add_argument("--concurrency", default="8,64")
    ap.add_argument("--out", default=str(REPO / "bench-results" / "feedback.json"))
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    svc = Services()
    rows = []
    try:
        for concurrency in levels:
            for path, runner in (("http", run_http), ("grpc", run_grpc), ("kafka", run_kafka)):
                prefix = f"{path}{concurrency}"
                log(f"{path} at {concurrency} concurrent: warm-up, then {args.ratings} ratings")
                asyncio.run(runner(svc, prefix + "w", 100, concurrency))
                t = time.perf_counter()
                results = asyncio.run(runner(svc, prefix, args.ratings, concurrency))
                wall = time.perf_counter() - t
                rows.append(summarise(path, concurrency, results, wall, records_on_topic(svc.kafka, prefix)))
    finally:
        svc.stop()

    header = f"{'path':<6}{'conc':>5}{'ratings/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'accepted':>10}{'on topic':>10}{'lost':>6}{'errors':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['path']:<6}{r['concurrency']:>5}{r['ratings_per_s']:>11.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{r['accepted']:>10}{r['distinct_ids_on_topic']:>10}{r['lost']:>6}{r['errors']:>8}")
    best_http = max((r for r in rows if r["path"] == "http"), key=lambda r: r["ratings_per_s"])
    print(f"\nTarget >= 2000 ratings/s with p99 < 50 ms through HTTP, zero lost: best HTTP row "
          f"{best_http['ratings_per_s']:.0f}/s, p99 {best_http['p99_ms']:.1f} ms, "
          f"lost {sum(r['lost'] for r in rows)} -> "
          f"{'PASS' if best_http['ratings_per_s'] >= 2000 and best_http['p99_ms'] < 50 else 'FAIL'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                               "ratings_per_level": args.ratings, "rows": rows}, indent=2))
    plot(rows, out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    paths = ["http", "grpc", "kafka"]
    levels = sorted({r["concurrency"] for r in rows})
    width = 0.8 / len(levels)
    for k, c in enumerate(levels):
        by = {r["path"]: r for r in rows if r["concurrency"] == c}
        xs = [i + k * width for i in range(len(paths))]
        ax1.bar(xs, [by[p]["ratings_per_s"] for p in paths], width, label=f"{c} concurrent")
        ax2.bar(xs, [by[p]["p99_ms"] for p in paths], width, label=f"{c} concurrent")
    for ax, title in ((ax1, "ratings/s (acks=all)"), (ax2, "p99 latency (ms)")):
        ax.set_xticks([i + width * (len(levels) - 1) / 2 for i in range(len(paths))], paths)
        ax.set_title(title)
        ax.legend()
    ax1.axhline(2000, color="grey", ls="--", lw=1)
    ax2.axhline(50, color="grey", ls="--", lw=1)
    fig.suptitle("Feedback path: HTTP gateway vs gRPC vs raw Kafka producer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
