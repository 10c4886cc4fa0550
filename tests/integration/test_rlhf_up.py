"""`rlhf up` as a user runs it: one command brings up the broker, the first models and every service
(inference, reward, feedback, trainer, gateway); the openai client chats through it and rates the
answer; the trainer and reward services answer over gRPC; SIGTERM stops every process cleanly."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest

from shared.kafka.embedded import free_port
from shared.pb import common_pb2, reward_pb2, reward_pb2_grpc, trainer_pb2, trainer_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    out = ""
    deadline = time.monotonic() + timeout
    while marker not in out:
        if proc.poll() is not None:
            raise AssertionError(f"rlhf up exited with {proc.returncode}:\n{out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} after {timeout} s:\n{out}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            out += os.read(proc.stdout.fileno(), 65536).decode(errors="replace")
    return out


def test_rlhf_up_serves_chat_and_stops_cleanly_on_sigterm(tmp_path):
    gateway_port, reward_port, trainer_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "RLHF_MODEL_STORE_ROOT": str(tmp_path / "models"),
        "RLHF_UP_BROKER_PORT": "0",
        # The random default model and an RM on the example rankings: seconds, not bootstrap's minutes.
        "RLHF_UP_BOOTSTRAP": "quick",
        "RLHF_GATEWAY_PORT": str(gateway_port),
        "RLHF_INFERENCE_GRPC_PORT": str(free_port()),
        "RLHF_FEEDBACK_GRPC_PORT": str(free_port()),
        "RLHF_FEEDBACK_METRICS_PORT": "0",
        "RLHF_REWARD_GRPC_PORT": str(reward_port),
        "RLHF_REWARD_METRICS_PORT": "0",
        "RLHF_REWARD_STATE_DIR": str(tmp_path / "reward-state"),
        "RLHF_TRAINER_GRPC_PORT": str(trainer_port),
        "RLHF_TRAINER_METRICS_PORT": "0",
        "RLHF_TRAINER_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        # The trainer stays paused: this test is about the processes, not about learning.
        "RLHF_TRAINER_START_PAUSED": "1",
        "RLHF_INFERENCE_METRICS_PORT": "0",
        "RLHF_INFERENCE_MAX_MODEL_LEN": "512",
        "RLHF_INFERENCE_MAX_TOKENS_LIMIT": "256",
        "RLHF_INFERENCE_DEFAULT_MAX_TOKENS": "16",
    }
    for inherited in (
        "RLHF_KAFKA_BOOTSTRAP_SERVERS",
        "RLHF_GATEWAY_INFERENCE_ADDRESS",
        "RLHF_GATEWAY_FEEDBACK_ADDRESS",
        "RLHF_FEEDBACK_TOKEN_SECRET",
        "RLHF_TRAINER_INFERENCE_ADDRESS",
        "RLHF_TRAINER_REWARD_ADDRESS",
        "RLHF_UP_SERVICES",
    ):
        env.pop(inherited, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flywheel.cli", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        banner = read_until(proc, "Press Ctrl-C to stop.", timeout=600)
        assert f"http://127.0.0.1:{gateway_port}/v1" in banner
        assert "embedded" in banner and "memory only" in banner

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="unused", max_retries=0)
        resp = client.chat.completions.create(model="rlhf-policy", messages=[{"role": "user", "content": "Hi!"}])
        assert resp.model_extra["policy_version"] == "policy-0001"
        assert resp.choices[0].model_extra["response_id"]
        assert (tmp_path / "models" / "policy-0001" / "manifest.json").is_file()
        choice = resp.choices[0]
        rating = httpx.post(
            f"http://127.0.0.1:{gateway_port}/v1/feedback",
            json={
                "type": "thumb",
                "response_id": choice.model_extra["response_id"],
                "thumb": "up",
                "user": "u1",
                "feedback_tokens": [choice.model_extra["feedback_token"]],
            },
            timeout=30,
        )
        assert rating.status_code == 200, rating.text
        assert rating.json()["revision"] == 1

        # The reward service scores with the first RM the launcher trained; the trainer reports its state.
        with grpc.insecure_channel(f"127.0.0.1:{reward_port}") as channel:
            scored = reward_pb2_grpc.RewardServiceStub(channel).Score(
                reward_pb2.ScoreRequest(
                    items=[
                        reward_pb2.ScoreItem(
                            messages=[common_pb2.ChatMessage(role="user", content="Hi!")],
                            response=choice.message.content or "x",
                        )
                    ]
                ),
                timeout=30,
            )
        assert scored.rm_version == "rm-0001" and len(scored.scores) == 1
        assert (tmp_path / "models" / "rm-0001" / "manifest.json").is_file()
        with grpc.insecure_channel(f"127.0.0.1:{trainer_port}") as channel:
            status = trainer_pb2_grpc.TrainerServiceStub(channel).Status(trainer_pb2.StatusRequest(), timeout=30)
        assert status.paused and status.base_policy_version == "policy-0001"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        rest = proc.stdout.read().decode(errors="replace")
        for name in ("gateway", "trainer", "feedback", "reward", "inference"):
            assert f"service stopped  service={name}" in rest
        # No process of the group is left behind (a force-killed vLLM engine core may take a moment).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            left = subprocess.run(["ps", "-o", "pid,args", "-g", str(proc.pid)], capture_output=True, text=True).stdout
            pytest.fail(f"processes left behind 15 s after rlhf up exited:\n{left}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
