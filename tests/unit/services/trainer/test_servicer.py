"""The servicer's conversions: every figure of the loop's status and gate results reaches the proto."""

from __future__ import annotations

import math

from services.trainer.loop import GateResult, StatusSnapshot
from services.trainer.servicer import gate_to_proto, status_to_proto


def test_gate_result_to_proto():
    msg = gate_to_proto(
        GateResult(
            published=True,
            reason="ok",
            step=7,
            version="policy-0003",
            parent="policy-0002",
            published_at=12.5,
            metrics={"kl_to_reference": 0.3},
            heldout_reward=1.5,
            kl=0.3,
            baseline_reward=1.25,
        )
    )
    assert msg.published and msg.reason == "ok" and msg.step == 7
    assert (msg.version.version, msg.version.parent, msg.version.published_at) == ("policy-0003", "policy-0002", 12.5)
    assert dict(msg.version.metrics) == {"kl_to_reference": 0.3}
    assert (msg.heldout_reward, msg.kl, msg.baseline_reward) == (1.5, 0.3, 1.25)


def test_status_to_proto_with_and_without_a_publication():
    gate = GateResult(published=False, reason="KL to the reference 3 exceeds the bound 1", step=4, kl=3.0)
    snap = StatusSnapshot(
        step=4,
        paused=True,
        state="paused",
        detail="",
        base_policy_version="policy-0002",
        reference_policy_version="policy-0001",
        last_published={
            "version": "policy-0002",
            "parent": "policy-0001",
            "published_at": 3.0,
            "metrics": {"heldout_reward": 0.5},
            "reason": "publish",
        },
        mean_reward=0.25,
        kl=0.5,
        entropy=6.0,
        rm_version="rm-0001",
        checkpoint_step=4,
        live_prompts=9,
        dropped_rollouts={"stale": 2},
        last_gate=gate,
        baseline_reward=0.5,
    )
    msg = status_to_proto(snap)
    assert (msg.step, msg.paused, msg.state, msg.base_policy_version) == (4, True, "paused", "policy-0002")
    assert msg.last_published.version == "policy-0002" and msg.last_published.parent == "policy-0001"
    assert dict(msg.dropped_rollouts) == {"stale": 2} and msg.live_prompts == 9 and msg.checkpoint_step == 4
    assert not msg.last_gate.published and "exceeds" in msg.last_gate.reason and msg.rm_version == "rm-0001"
    empty = status_to_proto(StatusSnapshot(**{**snap.__dict__, "last_published": None, "last_gate": None}))
    assert not empty.HasField("last_published") and not empty.HasField("last_gate")


def test_guard_results_reach_the_proto():
    gate = GateResult(
        published=False,
        reason="guard entry:c:f: the check raised ValueError: x",
        step=5,
        refused_by="entry:c:f",
        compared=True,
        guards=[
            {"name": "frozen_rm:rm-0001", "ok": True, "value": 0.5, "baseline": 0.55, "bar": 0.5, "reason": "ok"},
            {"name": "entry:c:f", "ok": False, "value": None, "baseline": None, "bar": None, "reason": "raised"},
        ],
    )
    msg = gate_to_proto(gate)
    assert msg.refused_by == "entry:c:f" and msg.compared and not msg.same_as_baseline
    frozen, entry = msg.guards
    assert (frozen.name, frozen.passed, frozen.value, frozen.baseline, frozen.bar) == (
        "frozen_rm:rm-0001",
        True,
        0.5,
        0.55,
        0.5,
    )
    assert entry.name == "entry:c:f" and not entry.passed and math.isnan(entry.value) and entry.reason == "raised"
    assert not entry.HasField("baseline") and not entry.HasField("bar")
