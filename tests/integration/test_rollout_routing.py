"""Routing between two policy versions served at once, end to end with real parts: an embedded broker,
two real vLLM engines (the stable group serves policy-0001, the canary group policy-0002), the
feedback service, and the gateway following rlhf.rollout. The test publishes RolloutEvents on the
broker as the rollout service would, and talks to the gateway with real HTTP clients.

Asserted: before any event everything goes to the stable version; during a canary every answer comes
from the version the assignment rule names for its principal and conversation (so the split follows
the share), a conversation keeps its version, an n=2 request in the canary is answered side by side
(one answer per version, each with its own token) and a pairwise rating of the two is accepted and
lands on rlhf.feedback naming both versions; a rollback sends every conversation back to the stable
version; a gateway started mid-canary routes as the running one does from its first request; and
GET /v1/flywheel reports the state."""

from __future__ import annotations

import math
import time
import uuid

import httpx
import pytest

from services.gateway.app import create_app
from services.gateway.rollout.routing import in_canary
from shared.events import RolloutEvent
from shared.kafka.publishers import KafkaPublisher
from shared.kafka.topics import FEEDBACK, ROLLOUT
from tests.conftest import (
    LoopThread,
    UvicornThread,
    consume_events,
    gateway_config,
    start_broker,
    start_feedback,
    start_inference,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRINCIPALS = [f"user{i:02d}" for i in range(24)]
KEYS = {p: f"test-{p}-routing-api-key-0123456789" for p in PRINCIPALS}
SHARE = 0.3


class Env:
    def __init__(self, broker, stable: str, canary: str, feedback, gateway: UvicornThread, gateway_cfg):
        self.broker = broker
        self.stable = stable
        self.canary = canary
        self.feedback = feedback
        self.gateway = gateway
        self.gateway_cfg = gateway_cfg
        self.sequence = 0
        self.publisher = KafkaPublisher(broker.kafka, "test-rollout")

    def publish(
        self, stage: str, *, canary: str = "", share: float = 0.0, version: str = "", evidence: dict | None = None
    ) -> None:
        """A RolloutEvent as the rollout service writes it (about ``version``, else the canary or the
        stable version), acknowledged by the broker."""
        self.sequence += 1
        ev = RolloutEvent(
            sequence=self.sequence,
            version=version or canary or self.stable,
            stage=stage,
            reason=f"test step {self.sequence}",
            stable=self.stable,
            canary=canary,
            canary_share=share if canary else 0.0,
            paused=False,
            mode="auto",
            evidence=evidence or {},
            at=time.time(),
        )
        self.publisher.publish_and_wait(ROLLOUT, ev, key="policy")

    def flywheel(self, url: str | None = None) -> dict:
        r = httpx.get((url or self.gateway.url) + "/v1/flywheel", headers=auth(PRINCIPALS[0]), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()


def auth(principal: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[principal]}"}


def chat(url: str, principal: str, conversation: str | None, n: int = 1, stream: bool = False) -> dict:
    body = {
        "model": "rlhf-policy",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 2,
        "n": n,
        "stream": stream,
    }
    if conversation:
        body["conversation_id"] = conversation
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth(principal), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def env(policy_store):
    own = start_broker()  # rollout events here reach only this module's gateways
    loop = LoopThread()
    stable = start_inference(loop, None, policy_store.root, policy_version=policy_store.first, follow_updates=False)
    canary = start_inference(loop, None, policy_store.root, policy_version=policy_store.second, follow_updates=False)
    feedback = start_feedback(loop, own.kafka)
    cfg = gateway_config(
        stable.address,
        feedback.address,
        api_keys=",".join(f"{p}:{k}" for p, k in KEYS.items()),
        canary_inference_address=canary.address,
        kafka=own.kafka,
    )
    gateway = UvicornThread(create_app(cfg))
    e = Env(own, policy_store.first, policy_store.second, feedback, gateway, cfg)
    yield e
    e.publisher.close()
    gateway.stop()
    for app in (feedback, canary, stable):
        loop.run(app.stop())
    loop.close()
    own.broker.stop()


def wait_for_routing(env: Env, canary: str) -> None:
    wait_until(lambda: env.flywheel()["canary"] == canary, 30, f"the gateway did not take canary={canary!r}")


def test_before_any_rollout_event_every_request_goes_to_the_stable_version(env):
    view = env.flywheel()
    assert view["following"] is True and view["canary_routing"] is True and view["sequence"] == 0
    versions = {chat(env.gateway.url, p, None)["policy_version"] for p in PRINCIPALS[:8]}
    assert versions == {env.stable}


def test_during_a_canary_each_request_gets_the_version_its_assignment_names(env):
    env.publish("canary", canary=env.canary, share=SHARE)
    wait_for_routing(env, env.canary)
    served, expected = [], []
    for i in range(120):
        principal, conversation = PRINCIPALS[i % len(PRINCIPALS)], f"conv-{i}"
        served.append(chat(env.gateway.url, principal, conversation)["policy_version"])
        expected.append(env.canary if in_canary(env.canary, SHARE, principal, conversation) else env.stable)
    assert served == expected, "every answer from the version the pure rule names"
    share = served.count(env.canary) / len(served)
    assert abs(share - SHARE) < 4 * math.sqrt(SHARE * (1 - SHARE) / len(served))
    view = env.flywheel()
    assert view["canary_share"] == SHARE and view["routed"]["canary"] >= served.count(env.canary)
    assert {v["role"]: v["version"] for v in view["versions"]} == {"stable": env.stable, "canary": env.canary}


def test_a_conversation_keeps_its_version_while_the_canary_runs(env):
    picks = {}
    for i in range(40):
        key = (PRINCIPALS[i % len(PRINCIPALS)], f"keep-{i}")
        picks[key] = chat(env.gateway.url, *key)["policy_version"]
        if len(set(picks.values())) == 2 and len(picks) >= 6:
            break
    assert set(picks.values()) == {env.stable, env.canary}, "both versions among the conversations"
    env.publish("paused", canary=env.canary, share=SHARE)  # an operator step that changes no routing
    wait_until(lambda: env.flywheel()["sequence"] == env.sequence, 30, "the pause did not arrive")
    for key, version in picks.items():
        assert chat(env.gateway.url, *key)["policy_version"] == version
    principal, conversation = next(k for k, v in picks.items() if v == env.canary)
    with httpx.stream(
        "POST",
        env.gateway.url + "/v1/chat/completions",
        json={"model": "rlhf-policy", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
              "stream": True, "conversation_id": conversation},
        headers=auth(principal),
        timeout=120,
    ) as r:  # fmt: skip
        versions = {line for line in r.iter_lines() if line.startswith("data: {")}
    assert versions and all(f'"policy_version":"{env.canary}"' in line for line in versions)


def test_side_by_side_answers_come_one_from_each_version_and_can_be_compared(env):
    principal, conversation = next(
        (p, f"pair-{i}") for i in range(1000) for p in PRINCIPALS if in_canary(env.canary, SHARE, p, f"pair-{i}")
    )
    reply = chat(env.gateway.url, principal, conversation, n=2)
    a, b = reply["choices"]
    assert {a["policy_version"], b["policy_version"]} == {env.stable, env.canary}
    assert a["response_id"] != b["response_id"] and a["feedback_token"] != b["feedback_token"]
    label = f"sxs-{uuid.uuid4().hex[:8]}"
    rating = {
        "type": "pairwise",
        "response_ids": [a["response_id"], b["response_id"]],
        "feedback_tokens": [a["feedback_token"], b["feedback_token"]],
        "preferred": "a",
        "user": label,
    }
    r = httpx.post(env.gateway.url + "/v1/feedback", json=rating, headers=auth(principal), timeout=60)
    assert r.status_code == 200, r.text
    (event,) = consume_events(env.broker.kafka, FEEDBACK, lambda e: e.payload.label == label, count=1)
    assert [x.policy_version for x in event.payload.responses] == [a["policy_version"], b["policy_version"]]
    assert event.payload.user_id == principal
    # outside the canary's share an n=2 request keeps both answers from the stable version
    other = next(p for p in PRINCIPALS if not in_canary(env.canary, SHARE, p, "pair-out"))
    assert {c["policy_version"] for c in chat(env.gateway.url, other, "pair-out", n=2)["choices"]} == {env.stable}


def test_a_gateway_started_mid_canary_routes_like_the_running_one_from_its_first_request(env):
    late = UvicornThread(create_app(env.gateway_cfg))
    try:
        for i in range(12):
            principal, conversation = PRINCIPALS[i], f"late-{i}"
            expected = env.canary if in_canary(env.canary, SHARE, principal, conversation) else env.stable
            assert chat(late.url, principal, conversation)["policy_version"] == expected
        assert env.flywheel(late.url)["sequence"] == env.sequence
    finally:
        late.stop()


def test_after_a_rollback_every_conversation_returns_to_the_stable_version(env):
    canary_conversations = [
        (p, f"back-{i}") for i in range(60) for p in PRINCIPALS[:4] if in_canary(env.canary, SHARE, p, f"back-{i}")
    ][:5]
    assert canary_conversations
    assert {chat(env.gateway.url, *k)["policy_version"] for k in canary_conversations} == {env.canary}
    evidence = {
        "thumbs": {"canary_n": 40, "canary_mean": 0.2, "stable_n": 200, "stable_mean": 0.6,
                   "difference": [-0.61, -0.12], "verdict": "rollback"},
        "canary": {"thumbs_up_rate": 0.2, "thumbs": 40, "completions": 50},
        "stable": {"thumbs_up_rate": 0.6, "thumbs": 200, "completions": 300},
    }  # fmt: skip
    env.publish("rolled_back", version=env.canary, evidence=evidence)
    wait_for_routing(env, "")
    assert {chat(env.gateway.url, *k)["policy_version"] for k in canary_conversations} == {env.stable}
    view = env.flywheel()
    assert view["canary_share"] == 0 and [v["role"] for v in view["versions"]] == ["stable"]
    stable_row = view["versions"][0]
    assert stable_row["thumbs_up_rate"] == 0.6 and stable_row["thumbs"] == 200
    last = view["decisions"][0]
    assert (last["stage"], last["version"], last["verdicts"]) == ("rolled_back", env.canary, {"thumbs": "rollback"})
