"""`rlhf up`'s supervisor on the real stack (the launcher's Stack: the embedded broker, inference,
feedback, gateway): kill -9 of the feedback service -> it is restarted, and a rating posted
afterwards through the gateway is accepted (2xx) and is on rlhf.feedback; kill -9 of the broker ->
it is restarted on its port with its topics created again (memory storage: empty, as the README
says), the services reconnect, and a rating posted afterwards is accepted and is on rlhf.feedback,
while those accepted before are gone with the old broker. Each restart is counted in
rlhf_up_restarts_total{service}."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import REGISTRY

from shared.config import load_config
from shared.events import FeedbackEvent
from shared.kafka.embedded import free_ports
from shared.kafka.envelope import decode
from shared.kafka.topics import FEEDBACK

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INHERITED = (
    "RLHF_KAFKA_BOOTSTRAP_SERVERS",
    "RLHF_GATEWAY_INFERENCE_ADDRESS",
    "RLHF_GATEWAY_FEEDBACK_ADDRESS",
    "RLHF_FEEDBACK_TOKEN_SECRET",
    "RLHF_UP_SERVICES",
    "RLHF_AUTH_TOKEN",
    "RLHF_AUTH_TOKEN_FILE",
    "RLHF_GATEWAY_API_KEYS",
    "RLHF_GATEWAY_API_KEYS_FILE",
    "RLHF_GATEWAY_ANONYMOUS",
    "RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS",
    "RLHF_VERSIONS_POLICY_SIGNING_KEY_FILE",
    "RLHF_VERSIONS_RM_SIGNING_KEY_FILE",
    "RLHF_VERSIONS_POLICY_VERIFY_KEY_FILE",
    "RLHF_VERSIONS_RM_VERIFY_KEY_FILE",
    "RLHF_VERSIONS_POLICY_VERIFY_KEYS",
)


def restarts(name: str) -> float:
    return REGISTRY.get_sample_value("rlhf_up_restarts_total", {"service": name}) or 0.0


@pytest.fixture
def supervised(tmp_path) -> Iterator[tuple]:
    from flywheel.launcher import Stack, UpConfig

    env = {k: v for k, v in os.environ.items() if k not in INHERITED}
    ports = iter(free_ports(3))  # all different: a port given twice is bound twice (SO_REUSEPORT)
    env.update(
        {
            "RLHF_MODEL_STORE_ROOT": str(tmp_path / "models"),
            "RLHF_UP_SERVICES": "inference,feedback,gateway",
            "RLHF_UP_ROLLOUT": "0",
            "RLHF_UP_BOOTSTRAP": "quick",
            "RLHF_UP_BROKER_PORT": "0",
            "RLHF_UP_LOG_DIR": str(tmp_path / "logs"),
            "RLHF_UP_METRICS_PORT": "0",
            "RLHF_UP_RESTART_BACKOFF_S": "0.2",
            "RLHF_UP_OPERATOR_TOKEN_FILE": str(tmp_path / "operator-token"),
            "RLHF_UP_GATEWAY_KEY_FILE": str(tmp_path / "gateway-api-key"),
            "RLHF_UP_KEYS_DIR": str(tmp_path / "keys"),
            "RLHF_GATEWAY_PORT": str(next(ports)),
            "RLHF_INFERENCE_GRPC_PORT": str(next(ports)),
            "RLHF_INFERENCE_METRICS_PORT": "0",
            "RLHF_INFERENCE_MAX_MODEL_LEN": "512",
            "RLHF_INFERENCE_MAX_TOKENS_LIMIT": "256",
            "RLHF_INFERENCE_DEFAULT_MAX_TOKENS": "8",
            "RLHF_FEEDBACK_GRPC_PORT": str(next(ports)),
            "RLHF_FEEDBACK_METRICS_PORT": "0",
        }
    )
    stack = Stack(load_config(UpConfig, env), env)
    stop = threading.Event()
    thread: threading.Thread | None = None
    try:
        stack.start()
        thread = threading.Thread(target=stack.supervise, args=(stop,), daemon=True)
        thread.start()
        yield stack, f"http://127.0.0.1:{env['RLHF_GATEWAY_PORT']}"
    finally:
        stop.set()
        if thread:
            thread.join(60)
        stack.stop()


def rate(base: str, key: str, deadline_s: float) -> str:
    """Chat once and rate the answer through the gateway, retrying while the stack recovers (a 503 or
    a refused connection); returns the response id of the accepted rating."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)
    deadline = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < deadline:
        try:
            resp = client.chat.completions.create(model="rlhf-policy", messages=[{"role": "user", "content": "Hi"}])
            choice = resp.choices[0]
            r = httpx.post(
                f"{base}/v1/feedback",
                json={
                    "type": "thumb",
                    "response_id": choice.model_extra["response_id"],
                    "thumb": "up",
                    "feedback_tokens": [choice.model_extra["feedback_token"]],
                },
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            if r.status_code == 200:
                return choice.model_extra["response_id"]
            last = f"{r.status_code} {r.text}"
            assert r.status_code in (502, 503, 504), last  # anything but "come back later" is a failure
        except (openai.APIConnectionError, openai.InternalServerError, httpx.TransportError) as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise AssertionError(f"no rating accepted within {deadline_s} s; last answer: {last}")


def rated_responses(bootstrap: str, want: set[str], idle_s: float = 5.0) -> set[str]:
    """The response ids rated on rlhf.feedback, read from the start until ``want`` is among them or
    nothing came for ``idle_s`` (not by end offsets: tansu's answer for the latest offset is not a
    partition's end)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        tps = [TopicPartition(FEEDBACK, p) for p in sorted(consumer.partitions_for_topic(FEEDBACK) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: set[str] = set()
        last = time.monotonic()
        while not want <= out and time.monotonic() - last < idle_s:
            for batch in consumer.poll(timeout_ms=200).values():
                for record in batch:
                    out |= {r.response_id for r in decode(record.value, expect=FeedbackEvent).payload.responses}
                last = time.monotonic()
        return out
    finally:
        consumer.close()


def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_killed_feedback_service_and_broker_come_back_and_later_ratings_are_accepted_and_on_the_topic(supervised):
    stack, base = supervised
    key = stack.gateway_key
    assert stack.broker is not None and not stack.broker.durable
    first = rate(base, key, 60)

    feedback = next(s for s in stack.services if s.name == "feedback")
    old_pid, before = feedback.proc.pid, restarts("feedback")
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: restarts("feedback") == before + 1, 30, "the feedback service was not restarted")
    # The counter goes up just before the new process is spawned: wait for that one too (as for the broker).
    wait_for(lambda: feedback.proc.pid != old_pid, 30, "the feedback service was counted but not started again")
    second = rate(base, key, 120)
    on_topic = rated_responses(stack.broker.bootstrap_servers, {first, second})
    assert {first, second} <= on_topic, "a rating accepted around the restart is not on rlhf.feedback"

    broker_pid, before = stack.broker.pid, restarts("kafka")
    os.kill(broker_pid, signal.SIGKILL)
    wait_for(lambda: restarts("kafka") == before + 1, 30, "the broker was not restarted")
    wait_for(lambda: stack.broker.running and stack.broker.pid != broker_pid, 60, "the broker did not come back")
    third = rate(base, key, 120)
    on_topic = rated_responses(stack.broker.bootstrap_servers, {third})
    assert third in on_topic, "a rating accepted after the broker restart is not on rlhf.feedback"
    # Memory storage: what was on the topics went with the old broker (docs/operations.md).
    assert not {first, second} & on_topic
    assert all(s.proc.poll() is None for s in stack.services), "a service died with the broker"
