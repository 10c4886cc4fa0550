"""Create or reconcile the loop's Kafka topics: the chart's post-install / pre-upgrade hook Job.

    python create_topics.py topics.json

topics.json (rendered from the chart's kafka.topics values):

    {"replicationFactor": 3,
     "topics": {"rlhf.completions": {"partitions": 6, "configs": {"retention.ms": "604800000"}}, ...}}

The brokers come from RLHF_KAFKA_BOOTSTRAP_SERVERS (comma-separated host:port), the client id from
RLHF_KAFKA_CLIENT_ID; TOPICS_WAIT_SECONDS bounds how long to wait for the brokers (a new Strimzi
cluster takes minutes to come up).

For every topic: create it when missing (partitions, replication factor, configs); otherwise add
partitions when it has fewer than planned and set every planned config that differs. It never
deletes a topic nor lowers a partition count (Kafka cannot), and it fails when a topic that must
keep its order (planned with one partition) has more than one. Replication factor changes of an
existing topic need a partition reassignment, so they are only reported.

Runs inside the project image: kafka-python, and the project's Kafka settings for TLS and SASL
(RLHF_KAFKA_SECURITY_PROTOCOL etc., the topic Job's own Kafka user). Exit code
0: the topics match the plan (or differ only in replication factor); 1: they do not; 2: no broker.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def log(msg: str, **fields: Any) -> None:
    extra = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"[kafka-topics] {msg}{' ' + extra if extra else ''}", flush=True)


def load_plan(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        plan = json.load(f)
    rf = int(plan["replicationFactor"])
    topics = {}
    for name, spec in plan["topics"].items():
        topics[name] = {
            "partitions": int(spec["partitions"]),
            "configs": {k: str(v) for k, v in (spec.get("configs") or {}).items()},
        }
    return {"replicationFactor": rf, "topics": topics}


def kafka_security() -> dict[str, Any]:
    """kafka-python's TLS and SASL settings from RLHF_KAFKA_*."""
    from shared.config import KafkaConfig, load_config
    from shared.kafka.client import security_kwargs

    return security_kwargs(load_config(KafkaConfig))


def connect(servers: list[str], client_id: str, wait_s: float) -> Any:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    security = kafka_security()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return KafkaAdminClient(
                bootstrap_servers=servers, client_id=client_id, request_timeout_ms=30000, **security
            )
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise
            log("waiting for the brokers", servers=",".join(servers), error=type(exc).__name__)
            time.sleep(5)


def existing_partitions(admin: Any, names: list[str]) -> dict[str, int]:
    """Partition count of each of ``names`` that exists."""
    present = set(admin.list_topics())
    wanted = [n for n in names if n in present]
    if not wanted:
        return {}
    return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(wanted) if not t.get("error_code")}


def current_configs(admin: Any, name: str, keys: list[str]) -> dict[str, str]:
    from kafka.admin import ConfigResource, ConfigResourceType

    result = admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name, {k: None for k in keys})], config_filter="all"
    )
    # {"topic": {name: {key: {"value": ..., "config_source": ..., ...}}}}
    entries = result.get("topic", {}).get(name, {})
    return {key: str(entry["value"]) for key, entry in entries.items() if entry.get("value") is not None}


def reconcile(admin: Any, plan: dict[str, Any]) -> list[str]:
    """Bring the cluster's topics to ``plan``; return the problems left (empty: done)."""
    from kafka.admin import ConfigResource, ConfigResourceType
    from kafka.errors import TopicAlreadyExistsError

    rf = plan["replicationFactor"]
    topics: dict[str, dict[str, Any]] = plan["topics"]
    problems: list[str] = []
    have = existing_partitions(admin, sorted(topics))

    missing = {n: s for n, s in topics.items() if n not in have}
    for name, spec in sorted(missing.items()):
        try:
            admin.create_topics(
                {name: {"num_partitions": spec["partitions"], "replication_factor": rf, "configs": spec["configs"]}}
            )
            log("created", topic=name, partitions=spec["partitions"], replication_factor=rf, **spec["configs"])
        except TopicAlreadyExistsError:
            log("already exists (created concurrently)", topic=name)

    for name, spec in sorted(topics.items()):
        if name in missing:
            continue
        count, want = have[name], spec["partitions"]
        if count < want:
            admin.create_partitions({name: want})
            log("added partitions", topic=name, partitions=f"{count}->{want}")
        elif count > want:
            msg = f"{name}: has {count} partitions, the plan says {want} (Kafka cannot remove partitions)"
            if want == 1:
                problems.append(msg + "; its events must stay in one ordered partition: recreate the topic")
            else:
                log("warning: " + msg)
        if spec["configs"]:
            now = current_configs(admin, name, sorted(spec["configs"]))
            changed = {k: v for k, v in spec["configs"].items() if now.get(k) != v}
            if changed:
                admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, changed)])
                log("updated configs", topic=name, **{k: f"{now.get(k)}->{v}" for k, v in changed.items()})
        replicas = _replication_factor(admin, name)
        if replicas is not None and replicas != rf:
            log(
                "warning: replication factor differs (reassign partitions to change it)",
                topic=name,
                has=replicas,
                plan=rf,
            )
    return problems


def _replication_factor(admin: Any, name: str) -> int | None:
    for t in admin.describe_topics([name]):
        parts = t.get("partitions") or []
        if parts:
            return len(parts[0].get("replica_nodes") or [])
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    plan = load_plan(argv[1])
    servers = [s.strip() for s in os.environ.get("RLHF_KAFKA_BOOTSTRAP_SERVERS", "").split(",") if s.strip()]
    if not servers:
        log("RLHF_KAFKA_BOOTSTRAP_SERVERS is empty")
        return 2
    client_id = os.environ.get("RLHF_KAFKA_CLIENT_ID", "rlhf") + "-topics"
    try:
        admin = connect(servers, client_id, float(os.environ.get("TOPICS_WAIT_SECONDS", "600")))
    except Exception as exc:  # noqa: BLE001 - reported as the job's failure
        log("no broker reachable", servers=",".join(servers), error=repr(exc))
        return 2
    try:
        problems = reconcile(admin, plan)
    finally:
        admin.close()
    for p in problems:
        log("error: " + p)
    if not problems:
        log("topics match the plan", topics=",".join(sorted(plan["topics"])))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
