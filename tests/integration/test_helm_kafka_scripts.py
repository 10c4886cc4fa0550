"""The Helm chart's Kafka scripts (the topic Job's create_topics.py, the init containers' wait_for.py)
run as the chart runs them, against the embedded Kafka-protocol broker. The chart's renders are
tested without a broker in tests/unit/deploy/test_helm_chart.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from kafka import KafkaAdminClient

from shared.kafka.embedded import EmbeddedBroker
from tests.unit.deploy.test_helm_chart import CHART, RELEASE, _load_wait_for, docs_of, one

pytestmark = pytest.mark.integration


def test_topic_script_against_a_real_broker(tmp_path):
    """Runs the script as the Job does, against the embedded Kafka-protocol broker."""
    cm = one(docs_of("default"), "ConfigMap", f"{RELEASE}-kafka-topics")
    plan = json.loads(cm["data"]["topics.json"])
    plan["replicationFactor"] = 1
    for spec in plan["topics"].values():
        spec["configs"].pop("min.insync.replicas")
    first = tmp_path / "topics.json"
    first.write_text(json.dumps(plan))
    # The embedded broker has no DescribeConfigs/CreatePartitions: the re-run plans no configs.
    for spec in plan["topics"].values():
        spec["configs"] = {}
    again = tmp_path / "again.json"
    again.write_text(json.dumps(plan))
    script = CHART / "files" / "create_topics.py"
    with EmbeddedBroker() as broker:
        env = {**os.environ, "RLHF_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "TOPICS_WAIT_SECONDS": "30"}
        for path in (first, again):
            run = subprocess.run(
                [sys.executable, str(script), str(path)], env=env, capture_output=True, text=True, timeout=120
            )
            assert run.returncode == 0, run.stdout + run.stderr
        assert "created" not in run.stdout and "topics match the plan" in run.stdout
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=[broker.bootstrap_servers])
        try:
            partitions = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(plan["topics"]))}
        finally:
            admin.close()
    assert partitions == {name: spec["partitions"] for name, spec in plan["topics"].items()}


def test_wait_for_topics_against_a_real_broker():

    wait_for = _load_wait_for()
    with EmbeddedBroker() as broker:
        servers = [broker.bootstrap_servers]
        assert wait_for.missing_topics(["rlhf.completions"], servers) == ["topic rlhf.completions"]
        admin = KafkaAdminClient(bootstrap_servers=servers)
        try:
            admin.create_topics({"rlhf.completions": {"num_partitions": 1, "replication_factor": 1}})
        finally:
            admin.close()
        assert wait_for.missing_topics(["rlhf.completions"], servers) == []
