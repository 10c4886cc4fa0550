"""A shortened `rlhf demo` proves the loop closes end to end with real parts: the offline bootstrap
(a few steps of each stage), the whole stack as `rlhf up` starts it (embedded broker, vLLM
inference for the stable and the canary version, reward, feedback, trainer, rollout, gateway;
separate processes on loopback), simulated users chatting through the OpenAI API and rating through
/v1/feedback with the real tokens. Ratings flow in, at least one new RM version and one new policy
version are published, the new policy version becomes the canary and serves the conversations the
routing rule assigns to it (and only those), and the report shows the canary and the traffic share.
Learning quality is not asserted here: that is tests/benchmarks/bench_demo.py."""

from __future__ import annotations

import os

import openai
import pytest

from services.gateway.rollout.routing import in_canary
from shared.kafka.embedded import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def demo_environ(tmp_path) -> dict[str, str]:
    ports = iter(free_ports(7))  # all different: a port given twice is bound twice (SO_REUSEPORT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_",))}
    env.update(
        {
            "RLHF_MODEL_STORE_ROOT": str(tmp_path / "models"),
            "RLHF_UP_BROKER_PORT": "0",
            "RLHF_GATEWAY_PORT": str(next(ports)),
            "RLHF_INFERENCE_GRPC_PORT": str(next(ports)),
            "RLHF_INFERENCE_METRICS_PORT": "0",
            "RLHF_INFERENCE_MAX_MODEL_LEN": "512",
            "RLHF_INFERENCE_MAX_TOKENS_LIMIT": "256",
            "RLHF_FEEDBACK_GRPC_PORT": str(next(ports)),
            "RLHF_FEEDBACK_METRICS_PORT": "0",
            "RLHF_REWARD_GRPC_PORT": str(next(ports)),
            "RLHF_REWARD_METRICS_PORT": "0",
            "RLHF_REWARD_STATE_DIR": str(tmp_path / "reward-state"),
            # learn soon and accept the first retrained RM: this test is about the loop closing
            "RLHF_REWARD_LEARN_EVERY_COMPARISONS": "16",
            "RLHF_REWARD_LEARN_EVERY_S": "30",
            "RLHF_REWARD_GATE_TOLERANCE": "1.0",
            "RLHF_TRAINER_GRPC_PORT": str(next(ports)),
            "RLHF_TRAINER_METRICS_PORT": "0",
            "RLHF_ROLLOUT_GRPC_PORT": str(next(ports)),
            "RLHF_ROLLOUT_METRICS_PORT": "0",
            "RLHF_UP_CANARY_GRPC_PORT": str(next(ports)),
            "RLHF_UP_CANARY_METRICS_PORT": "0",
            # the canary keeps its traffic for the whole test (no decision): this test is about routing
            "RLHF_DEMO_CANARY_SHARE": "0.5",
            "RLHF_DEMO_CANARY_TIMEOUT_S": "3600",
            "RLHF_ROLLOUT_INITIAL_MODE": "manual",
            "RLHF_TRAINER_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
            "RLHF_TRAINER_ROLLOUTS_PER_ITERATION": "8",
            "RLHF_TRAINER_PUBLISH_EVERY": "2",
            "RLHF_TRAINER_HELDOUT_PROMPTS": "4",
            "RLHF_TRAINER_REWARD_TOLERANCE": "1000",
            "RLHF_DEMO_DURATION_S": "600",
            "RLHF_DEMO_UNTIL_NEW_VERSIONS": "1",
            "RLHF_DEMO_USERS": "2",
            "RLHF_DEMO_MAX_TOKENS": "24",
            "RLHF_DEMO_PROGRESS_EVERY_S": "5",
            "RLHF_DEMO_EVALUATE": "0",
            "RLHF_DEMO_BOOTSTRAP_QUICK": "1",
            "RLHF_DEMO_REPORT_DIR": str(tmp_path / "report"),
            "RLHF_UP_GATEWAY_KEY_FILE": str(tmp_path / "gateway-api-key"),
        }
    )
    return env


@pytest.mark.timeout(1800)
def test_shortened_demo_closes_the_loop(tmp_path):
    from flywheel.bootstrap.pipeline import QUICK, run_bootstrap
    from flywheel.demo.run import DemoConfig, gateway_url_of, run_demo, start_stack
    from shared.config import load_config
    from shared.model_store import ModelStore

    env = demo_environ(tmp_path)
    cfg = load_config(DemoConfig, env)
    store = ModelStore(tmp_path / "models")
    run_bootstrap(store, report_dir=tmp_path / "bootstrap", settings=QUICK)
    assert store.versions("policy") == ["policy-0001"] and store.versions("rm") == ["rm-0001"]

    stack = start_stack(cfg, env)
    try:
        url = gateway_url_of(stack)
        # The demo uses the stack as its own: each simulated user has a key the gateway knows (its
        # principal), and the report reads the stack's trainer, broker and metrics.
        result = run_demo(cfg, stack=stack)
        summary = result.summary

        # ratings flowed in through the real endpoint, of every kind
        assert summary["ratings_accepted"] >= 16, summary
        assert set(summary["ratings_by_kind"]) == {"thumb", "likert", "pairwise", "ranking"}
        assert summary["ratings_refused"] <= summary["ratings_accepted"] // 10, summary
        principals = {r.principal for r in result.interactions if r.principal}
        assert principals == {"sim-user-0", "sim-user-1"}, "each simulated user rates as its own principal"
        # the reward learner and the trainer published new versions during the run
        assert summary["rm_versions_published"], "no new reward model version was published"
        assert summary["policy_versions_published"], "no new policy version was published"
        assert set(summary["policy_versions_published"]) <= set(store.versions("policy")) - {"policy-0001"}
        served_new = {v for r in result.interactions for v in r.choice_versions} - {"policy-0001"}
        assert served_new and served_new <= set(summary["policy_versions_published"]), served_new

        # The first candidate became the canary (manual mode: it stays the canary) and served the
        # conversations the gateway's routing rule gives it, and no other.
        [canary] = summary["canaries"]
        assert canary["outcome"] == "running" and canary["version"] in served_new, summary["canaries"]
        assert store.pointer("policy", "canary") == canary["version"] and store.current("policy") == "policy-0001"
        for r in result.interactions:
            if r.kind == "error":
                continue
            assigned = in_canary(canary["version"], 0.5, r.principal, r.conversation_id)
            got, asked_at = set(r.choice_versions), r.at - r.chat_latency_s
            if asked_at < canary["started_at"] or not assigned:
                assert canary["version"] not in got, r
            elif asked_at > canary["started_at"] + 30:  # the gateway and the canary engine follow within seconds
                assert canary["version"] in got, r

        # The same through the public API: a conversation the rule assigns to the canary gets it.
        client = openai.OpenAI(base_url=url + "/v1", api_key=stack.gateway_key, max_retries=0)
        for conversation, want in (
            (next(f"c{i}" for i in range(1000) if in_canary(canary["version"], 0.5, "local", f"c{i}")), canary),
            (next(f"c{i}" for i in range(1000) if not in_canary(canary["version"], 0.5, "local", f"c{i}")), None),
        ):
            resp = client.chat.completions.create(
                model=client.models.list().data[0].id,
                max_tokens=8,
                messages=[{"role": "user", "content": "What is 2 plus 3?"}],
                extra_body={"conversation_id": conversation},
            )
            expected = canary["version"] if want else "policy-0001"
            assert resp.model_extra["policy_version"] == expected, conversation

        for name in (
            "report.md",
            "thumbs_up_by_policy.png",
            "rm_accuracy.png",
            "serving_timeline.png",
            "traffic_share.png",
        ):
            assert (tmp_path / "report" / name).stat().st_size > 0, name
        assert (tmp_path / "report" / "ppo_reward_kl.png").exists(), "the trainer's PPO steps were not observed"
        assert "## Canaries" in (tmp_path / "report" / "report.md").read_text()
    finally:
        stack.stop()
