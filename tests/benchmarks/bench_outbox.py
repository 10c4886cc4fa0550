"""The inference outbox's cost: memory queue vs spill journal (shared/kafka/spill.py).

    .venv/bin/python tests/benchmarks/bench_outbox.py              # 2,000 completion events each
    .venv/bin/python tests/benchmarks/bench_outbox.py --events 500 --out bench-results

For each queue: the caller's cost of ``publish`` (what a finished request pays, µs per event), the
time until the embedded broker has acknowledged every event (acks=all, one at a time as the outbox
sends), and for the journal the replay: events left by a closed outbox whose broker was down, sent
by a new outbox on the same directory. Prints a table and writes bench-results/outbox.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shared.config import KafkaConfig
from shared.kafka.embedded import free_port
from shared.kafka.publishers import KafkaPublisher, Outbox
from shared.kafka.topics import COMPLETIONS
from tests.conftest import start_broker
from tests.integration.test_outbox_spill import completion


def publish_all(outbox: Outbox, events: int, tag: str) -> list[float]:
    costs = []
    for n in range(events):
        event = completion(f"{tag}", n, text="word " * 60)
        started = time.perf_counter()
        outbox.publish(COMPLETIONS, event, key=tag)
        costs.append(time.perf_counter() - started)
    return costs


def run(events: int) -> dict:
    broker = start_broker()
    out: dict = {"events": events}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, spill in (("memory", None), ("spill journal", Path(tmp) / "outbox")):
                outbox = Outbox(KafkaPublisher(broker.kafka, "bench"), spill_dir=spill, max_backoff_s=0.2)
                started = time.perf_counter()
                costs = publish_all(outbox, events, f"bench-{name}")
                assert outbox.flush(600)
                total = time.perf_counter() - started
                outbox.close()
                out[name] = {
                    "publish_us_median": round(statistics.median(costs) * 1e6, 1),
                    "publish_us_p99": round(sorted(costs)[int(0.99 * len(costs))] * 1e6, 1),
                    "all_acknowledged_s": round(total, 2),
                    "events_per_s": round(events / total, 1),
                }
            down = KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}", delivery_timeout_s=1.0)
            journal = Path(tmp) / "replay"
            first = Outbox(KafkaPublisher(down, "bench"), spill_dir=journal, max_backoff_s=0.2)
            publish_all(first, events, "bench-replay")
            first.close(0.5)
            started = time.perf_counter()
            second = Outbox(KafkaPublisher(broker.kafka, "bench"), spill_dir=journal, max_backoff_s=0.2)
            opened = time.perf_counter() - started
            assert second.replayed == events
            assert second.flush(600)
            out["replay"] = {
                "open_s": round(opened, 3),
                "replayed": second.replayed,
                "all_acknowledged_s": round(time.perf_counter() - started, 2),
            }
            second.close()
    finally:
        broker.broker.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    result = run(args.events)
    print(f"{'queue':<15} {'publish µs p50':>15} {'p99':>8} {'acked in s':>11} {'events/s':>9}")
    for name in ("memory", "spill journal"):
        r = result[name]
        print(
            f"{name:<15} {r['publish_us_median']:>15} {r['publish_us_p99']:>8} "
            f"{r['all_acknowledged_s']:>11} {r['events_per_s']:>9}"
        )
    r = result["replay"]
    print(f"replay: {r['replayed']} events, journal opened in {r['open_s']} s, all acknowledged in "
          f"{r['all_acknowledged_s']} s")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "outbox.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
