"""`rlhf up` as a user runs it: one command brings up the broker, the first models and every service
(inference and its canary engine, reward, feedback, rollout, trainer, gateway); the openai client
chats through it and rates the answer; the trainer, reward and rollout services answer over gRPC;
SIGTERM stops every process cleanly."""

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

from shared.config import credential_entry
from shared.grpc_channels import ClientCredentials, sync_channel
from shared.kafka.embedded import free_ports
from shared.pb import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OPERATOR_TOKEN = "rlhf-up-test-operator-token-0123456789"
TRAINER_TOKEN = "rlhf-up-test-trainer-token-0123456789"


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
    ports = iter(free_ports(7))  # all different: a port given twice is bound twice (SO_REUSEPORT)
    gateway_port, reward_port, trainer_port = next(ports), next(ports), next(ports)
    rollout_port, canary_port = next(ports), next(ports)
    env = {
        **os.environ,
        "RLHF_MODEL_STORE_ROOT": str(tmp_path / "models"),
        "RLHF_UP_BROKER_PORT": "0",
        # The random default model and an RM on the example rankings: seconds, not bootstrap's minutes.
        "RLHF_UP_BOOTSTRAP": "quick",
        "RLHF_GATEWAY_PORT": str(gateway_port),
        "RLHF_INFERENCE_GRPC_PORT": str(next(ports)),
        "RLHF_FEEDBACK_GRPC_PORT": str(next(ports)),
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
        # Progressive rollout (on by default): the rollout service and the canary engine.
        "RLHF_ROLLOUT_GRPC_PORT": str(rollout_port),
        "RLHF_ROLLOUT_METRICS_PORT": "0",
        "RLHF_UP_CANARY_GRPC_PORT": str(canary_port),
        "RLHF_UP_CANARY_METRICS_PORT": "0",
        "RLHF_INFERENCE_MAX_MODEL_LEN": "512",
        "RLHF_INFERENCE_MAX_TOKENS_LIMIT": "256",
        "RLHF_INFERENCE_DEFAULT_MAX_TOKENS": "16",
        # Auth is on: the launcher makes each caller's token; this test brings the operator's and one
        # more trainer credential of its own (the launcher accepts the RLHF_AUTH_ACCEPT it is given).
        "RLHF_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "RLHF_UP_OPERATOR_TOKEN_FILE": str(tmp_path / "operator-token"),
        "RLHF_AUTH_ACCEPT": credential_entry("trainer", TRAINER_TOKEN),
        # The gateway's own key for the principal `local`, made by the launcher and kept here.
        "RLHF_UP_GATEWAY_KEY_FILE": str(tmp_path / "gateway-api-key"),
        # The version lines' key pairs, made by the launcher on its first start.
        "RLHF_UP_KEYS_DIR": str(tmp_path / "keys"),
    }
    for inherited in (
        "RLHF_KAFKA_BOOTSTRAP_SERVERS",
        "RLHF_GATEWAY_INFERENCE_ADDRESS",
        "RLHF_GATEWAY_FEEDBACK_ADDRESS",
        "RLHF_FEEDBACK_TOKEN_SECRET",
        "RLHF_TRAINER_INFERENCE_ADDRESS",
        "RLHF_TRAINER_REWARD_ADDRESS",
        "RLHF_UP_SERVICES",
        "RLHF_AUTH_TOKEN",
        "RLHF_AUTH_TOKEN_FILE",
        "RLHF_GATEWAY_API_KEYS",
        "RLHF_GATEWAY_API_KEYS_FILE",
        "RLHF_GATEWAY_ANONYMOUS",
        "RLHF_VERSIONS_POLICY_SIGNING_KEY_FILE",
        "RLHF_VERSIONS_RM_SIGNING_KEY_FILE",
        "RLHF_VERSIONS_POLICY_VERIFY_KEY_FILE",
        "RLHF_VERSIONS_RM_VERIFY_KEY_FILE",
        "RLHF_VERSIONS_POLICY_VERIFY_KEYS",
        "RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS",
        "RLHF_TRAINER_ROLLOUT",
        "RLHF_UP_ROLLOUT",
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

        # The launcher made the key of the principal `local`: printed, and kept readable by this user only.
        key_file = tmp_path / "gateway-api-key"
        key = key_file.read_text().strip()
        assert len(key) >= 24 and key in banner and key_file.stat().st_mode & 0o777 == 0o600
        assert key not in (tmp_path / "gateway-api-key.sha256").read_text(), "the gateway gets only its hash"
        base = f"http://127.0.0.1:{gateway_port}"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key=key, max_retries=0)
        resp = client.chat.completions.create(model="rlhf-policy", messages=[{"role": "user", "content": "Hi!"}])
        assert resp.model_extra["policy_version"] == "policy-0001"
        assert resp.choices[0].model_extra["response_id"]
        assert (tmp_path / "models" / "policy-0001" / "manifest.json").is_file()
        # Versions are signed with the launcher's keys (the services verify them to serve at all).
        assert (tmp_path / "models" / "policy-0001" / "manifest.sig").is_file()
        assert (tmp_path / "models" / "rm-0001" / "manifest.sig").is_file()
        assert (tmp_path / "keys" / "policy-signing.pem").stat().st_mode & 0o777 == 0o600
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
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert rating.status_code == 200, rating.text
        assert rating.json()["revision"] == 1
        # On loopback anonymous sessions are on: the chat page (or any client keeping cookies) gets in.
        with httpx.Client(base_url=base, timeout=30) as browser_like:
            me = browser_like.get("/v1/session").json()
            assert me["anonymous"] and me["principal"].startswith("anon:")
            assert browser_like.get("/v1/session").json() == me

        # The reward service scores with the first RM the launcher trained; the trainer reports its state.
        with sync_channel(f"127.0.0.1:{reward_port}", ClientCredentials(token=TRAINER_TOKEN)) as channel:
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
        with sync_channel(f"127.0.0.1:{trainer_port}", ClientCredentials(token=OPERATOR_TOKEN)) as channel:
            status = trainer_pb2_grpc.TrainerServiceStub(channel).Status(trainer_pb2.StatusRequest(), timeout=30)
        assert status.paused and status.base_policy_version == "policy-0001"
        # Without a credential, or with one the trainer does not take for its controls: refused.
        for creds, code in (
            (ClientCredentials(), grpc.StatusCode.UNAUTHENTICATED),
            (ClientCredentials(token=TRAINER_TOKEN), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with sync_channel(f"127.0.0.1:{trainer_port}", creds) as channel, pytest.raises(grpc.RpcError) as err:
                trainer_pb2_grpc.TrainerServiceStub(channel).Resume(trainer_pb2.ResumeRequest(), timeout=30)
            assert err.value.code() == code
        # The rollout service runs: the canary engine serves the stable version while no canary runs.
        assert f"127.0.0.1:{canary_port}" in banner and "rlhf rollout status" in banner
        with sync_channel(f"127.0.0.1:{rollout_port}", ClientCredentials(token=OPERATOR_TOKEN)) as channel:
            rollout = rollout_pb2_grpc.RolloutServiceStub(channel).Status(
                rollout_pb2.RolloutStatusRequest(), timeout=30
            )
        assert (rollout.stable, rollout.canary, rollout.mode) == ("policy-0001", "", "auto")
        assert (tmp_path / "keys" / "rollout-signing.pem").stat().st_mode & 0o777 == 0o600
        with sync_channel(f"127.0.0.1:{canary_port}", ClientCredentials(token=TRAINER_TOKEN)) as channel:
            policy = inference_pb2_grpc.InferenceServiceStub(channel).GetPolicy(
                inference_pb2.GetPolicyRequest(), timeout=30
            )
        assert policy.policy_version == "policy-0001"
        # `rlhf trainer` reads the operator token the launcher wrote, readable by this user only.
        token_file = tmp_path / "operator-token"
        assert token_file.read_text().strip() == OPERATOR_TOKEN and token_file.stat().st_mode & 0o777 == 0o600
        control_env = {k: v for k, v in env.items() if k != "RLHF_OPERATOR_TOKEN"}
        control = subprocess.run(
            [sys.executable, "-m", "flywheel.cli", "trainer", "status", "--address", f"127.0.0.1:{trainer_port}"]
            + ["--token-file", str(token_file)],
            env=control_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert control.returncode == 0 and '"paused": true' in control.stdout, control.stdout + control.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        rest = proc.stdout.read().decode(errors="replace")
        for name in ("gateway", "trainer", "rollout", "feedback", "reward", "inference-canary", "inference"):
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
