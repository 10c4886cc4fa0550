"""The embedded broker's storage, memory against s3 (tansu's s3:// engine on a local s3rver):

    .venv/bin/python tests/benchmarks/bench_broker_storage.py [--records 500] [--batch 100]
        [--concurrency 48] [--storages memory,s3] [--out DIR]

For each storage: a fresh broker and one topic of one partition (what `rlhf up` gives rlhf.feedback),
then, with the feedback service's publisher (RdKafkaPublisher: librdkafka, acks=all, idempotent) and
rating-sized records (FeedbackEvent envelopes):

- sequential: one rating at a time, each awaited until acknowledged (a single user rating; p50/p99);
- batched: ``--batch`` ratings handed over at once, awaited together (what the feedback service's
  SubmitFeedbackBatch does with the ratings that arrive together);
- concurrent: ``--concurrency`` users each publishing one rating after the other (librdkafka shares
  produce requests between them, as in the feedback service under load; p50/p99 per rating);
- restart: kill -9 of the broker, start again on the same port and storage: seconds until it
  listens, and how many of the acknowledged records a reader finds from the start afterwards
  (memory: none, the topic is gone) and how fast it reads them (what a consumer replaying the topic
  after a restart, e.g. the feedback ledger, sees);
- cpu: CPU ms the broker's processes (tansu, and s3rver for s3) spent per record while producing
  (they share the machine's cores with the services);
- disk: bytes under the storage directory per record (s3).

Prints a table and writes <out>/broker_storage.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from shared.config import KafkaConfig
from shared.events import FeedbackEvent, RatedResponse
from shared.kafka.admin import ensure_topics
from shared.kafka.embedded import EmbeddedBroker
from shared.kafka.publishers import RdKafkaPublisher

TOPIC = "bench.storage"


def rating(n: int) -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=f"bench-{n:08d}",
        kind="thumb",
        user_id=f"user-{n % 50}",
        target=f"thumb:resp-{n:08d}",
        revision=1,
        supersedes=None,
        responses=[RatedResponse(f"resp-{n:08d}", "policy-0001", "0" * 64)],
        thumb="up",
        comment="a comment of a typical length, about sixty characters long.",
        received_at=time.time(),
    )


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank of the sorted values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def read_all(kafka: KafkaConfig, expected: int, idle_s: float = 5.0) -> tuple[int, float]:
    """(records on TOPIC from the start, seconds until the last of them arrived) with a fresh reader,
    which stops at ``expected`` records or after ``idle_s`` without one. (Not by end offsets: tansu
    0.6.0's ListOffsets answer for the latest offset is not the partition's end.)"""
    consumer = KafkaConsumer(bootstrap_servers=kafka.servers, enable_auto_commit=False, auto_offset_reset="earliest")
    started = time.perf_counter()
    last = started
    try:
        parts = consumer.partitions_for_topic(TOPIC) or set()
        tps = [TopicPartition(TOPIC, p) for p in sorted(parts)]
        if not tps:
            return 0, 0.0
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        count = 0
        while count < expected and time.perf_counter() - last < idle_s:
            for batch in consumer.poll(timeout_ms=200).values():
                count += len(batch)
                last = time.perf_counter()
        return count, last - started
    finally:
        consumer.close()


def cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (Linux); 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_cpu_s(broker: EmbeddedBroker) -> float:
    return cpu_s(broker.pid) + (cpu_s(broker.s3.pid) if broker.s3 else 0.0)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def produce(publisher: RdKafkaPublisher, records: int, batch: int, concurrency: int) -> dict[str, Any]:
    latencies = []
    started = time.perf_counter()
    for n in range(records):
        t = time.perf_counter()
        await publisher.publish(TOPIC, rating(n), key=f"user-{n % 50}")
        latencies.append(time.perf_counter() - t)
    sequential_s = time.perf_counter() - started
    started = time.perf_counter()
    failed = 0
    for first in range(records, 2 * records, batch):
        out = await publisher.publish_many(
            [(TOPIC, rating(n), f"user-{n % 50}") for n in range(first, min(first + batch, 2 * records))]
        )
        failed += sum(1 for r in out if isinstance(r, Exception))
    batched_s = time.perf_counter() - started
    concurrent = []

    async def user(first: int) -> None:
        for n in range(first, 3 * records, concurrency):
            t = time.perf_counter()
            await publisher.publish(TOPIC, rating(n), key=f"user-{n % 50}")
            concurrent.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(user(2 * records + i) for i in range(concurrency)))
    concurrent_s = time.perf_counter() - started
    return {
        "sequential_acks_per_s": records / sequential_s,
        "sequential_p50_ms": 1000 * statistics.median(latencies),
        "sequential_p99_ms": 1000 * percentile(latencies, 0.99),
        "batched_acks_per_s": records / batched_s,
        "batched_failed": failed,
        "concurrent_acks_per_s": records / concurrent_s,
        "concurrent_p50_ms": 1000 * statistics.median(concurrent),
        "concurrent_p99_ms": 1000 * percentile(concurrent, 0.99),
    }


def run(storage: str, records: int, batch: int, concurrency: int, work: Path) -> dict[str, Any]:
    data_dir = work / storage if storage == "s3" else None
    broker = EmbeddedBroker(data_dir=data_dir).start()
    kafka = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic_partitions=1)
    publisher = RdKafkaPublisher(kafka, "bench")
    try:
        ensure_topics(kafka, (TOPIC,))
        publisher.warm_up()
        result: dict[str, Any] = {"storage": storage, "records": 3 * records, "batch": batch}
        result["concurrency"] = concurrency
        cpu_before = broker_cpu_s(broker)
        result.update(asyncio.run(produce(publisher, records, batch, concurrency)))
        result["broker_cpu_ms_per_record"] = 1000 * (broker_cpu_s(broker) - cpu_before) / (3 * records)
        publisher.close()
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGKILL)
        started = time.perf_counter()
        broker.restart()
        result["restart_s"] = time.perf_counter() - started
        ensure_topics(kafka, (TOPIC,))
        found, read_s = read_all(kafka, 3 * records)
        result["after_restart_records"] = found
        result["replay_records_per_s"] = found / read_s if found else 0.0
        result["disk_bytes_per_record"] = dir_bytes(data_dir) / (3 * records) if data_dir else 0.0
        return result
    finally:
        publisher.close()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500, help="records per phase (sequential, batched)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--storages", default="memory,s3")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        for storage in args.storages.split(","):
            results.append(run(storage, args.records, args.batch, args.concurrency, Path(tmp)))
    columns = [
        ("storage", "{}"),
        ("sequential_acks_per_s", "{:.0f}"),
        ("sequential_p50_ms", "{:.1f}"),
        ("sequential_p99_ms", "{:.1f}"),
        ("batched_acks_per_s", "{:.0f}"),
        ("concurrent_acks_per_s", "{:.0f}"),
        ("concurrent_p50_ms", "{:.1f}"),
        ("concurrent_p99_ms", "{:.1f}"),
        ("broker_cpu_ms_per_record", "{:.2f}"),
        ("restart_s", "{:.2f}"),
        ("after_restart_records", "{}"),
        ("replay_records_per_s", "{:.0f}"),
        ("disk_bytes_per_record", "{:.0f}"),
    ]
    print(" | ".join(name for name, _ in columns))
    for r in results:
        print(" | ".join(fmt.format(r[name]) for name, fmt in columns))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "broker_storage.json"
    out.write_text(json.dumps({"records_per_phase": args.records, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
