"""Init container of the chart's services: wait until what the service needs at start exists.

    python wait_for.py [--policy STORE_ROOT] [--reward-model STORE_ROOT] [--topics TOPIC,...] [--interval SECONDS]

--policy: the model store has a current policy (STORE_ROOT/policy.current, written by
`rlhf bootstrap` or the trainer). --reward-model: it has a current reward model (STORE_ROOT/rm.current,
written by `rlhf bootstrap` after the policy, or the reward learner). --topics: the Kafka topics
exist (created by the chart's topic Job, which runs after install); the brokers come from RLHF_KAFKA_BOOTSTRAP_SERVERS,
TLS and SASL from the other RLHF_KAFKA_* settings (the service's own Kafka user, which can see the
topics it reads and writes). Waiting here
keeps the service out of a crash loop (and its startup probe budget untouched) on a fresh install.
It waits as long as it takes: the pod stays in Init and says what it is waiting for.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def missing_current(store_root: str, line: str, what: str) -> list[str]:
    marker = os.path.join(store_root, f"{line}.current")
    return [] if os.path.exists(marker) else [f"{marker} (no {what} published yet)"]


def kafka_security() -> dict:
    """kafka-python's TLS and SASL settings from RLHF_KAFKA_* (the service's own Kafka user)."""
    from shared.config import KafkaConfig, load_config
    from shared.kafka.client import security_kwargs

    return security_kwargs(load_config(KafkaConfig))


def missing_topics(topics: list[str], servers: list[str]) -> list[str]:
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=servers, client_id="rlhf-wait-for", request_timeout_ms=10000, **kafka_security()
        )
    except Exception as exc:  # noqa: BLE001 - any failure means "not there yet"
        return [f"Kafka at {','.join(servers)} ({type(exc).__name__})"]
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    return [f"topic {t}" for t in topics if t not in existing]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", metavar="STORE_ROOT")
    parser.add_argument("--reward-model", metavar="STORE_ROOT")
    parser.add_argument("--topics", default="")
    parser.add_argument("--interval", type=float, default=5.0)
    args = parser.parse_args(argv)
    topics = [t for t in args.topics.split(",") if t]
    servers = [s.strip() for s in os.environ.get("RLHF_KAFKA_BOOTSTRAP_SERVERS", "").split(",") if s.strip()]
    if topics and not servers:
        print("[wait-for] --topics needs RLHF_KAFKA_BOOTSTRAP_SERVERS", flush=True)
        return 2
    while True:
        missing = (
            (missing_current(args.policy, "policy", "policy") if args.policy else [])
            + (missing_current(args.reward_model, "rm", "reward model") if args.reward_model else [])
            + (missing_topics(topics, servers) if topics else [])
        )
        if not missing:
            print("[wait-for] ready", flush=True)
            return 0
        print(f"[wait-for] waiting for: {'; '.join(missing)}", flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
