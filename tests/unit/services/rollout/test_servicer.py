"""The rollout servicer's conversions: status, verdict, signals and steps to protobuf, evidence as
finite JSON; and a service still rebuilding its state answers UNAVAILABLE."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from services.rollout.domain import SignalsView, StatusView, VerdictView
from services.rollout.servicer import (
    RolloutServicer,
    evidence_json,
    signals_to_proto,
    status_to_proto,
    step_to_proto,
)
from shared.errors import Unavailable
from shared.events import RolloutEvent
from shared.pb import rollout_pb2

STEP = RolloutEvent(
    3, "policy-0004", "rolled_back", "worse on thumbs", "policy-0002", "", 0.0, False, "auto",
    evidence={"thumbs": {"difference": [-0.5, -0.1], "canary_mean": None, "x": math.inf}}, at=12.5,
)  # fmt: skip


def test_evidence_is_compact_finite_json():
    doc = json.loads(evidence_json({"a": math.nan, "b": [1.0, math.inf], "c": {"d": None}, "e": object}))
    assert doc["a"] is None and doc["b"] == [1.0, None] and doc["c"] == {"d": None} and doc["e"].startswith("<class")


def test_a_step_keeps_every_field():
    msg = step_to_proto(STEP)
    assert (msg.sequence, msg.version, msg.stage, msg.reason, msg.stable, msg.canary, msg.at) == (
        3,
        "policy-0004",
        "rolled_back",
        "worse on thumbs",
        "policy-0002",
        "",
        12.5,
    )
    assert json.loads(msg.evidence_json)["thumbs"] == {"difference": [-0.5, -0.1], "canary_mean": None, "x": None}


def test_signals_without_data_are_zero_and_counts_are_kept():
    summary = {"thumbs_up_rate": None, "thumbs": 0, "likert_mean": 5.5, "likerts": 4, "completions": 9,
               "error_rate": 0.0, "latency_p50_s": 0.25, "latency_p90_s": None, "mean_tokens": 12.0}  # fmt: skip
    msg = signals_to_proto(SignalsView("policy-0004", summary))
    assert (msg.version, msg.thumbs_up_rate, msg.thumbs, msg.likert_mean, msg.likerts) == ("policy-0004", 0, 0, 5.5, 4)
    assert (msg.completions, msg.latency_p50_s, msg.latency_p90_s, msg.mean_tokens) == (9, 0.25, 0, 12.0)
    assert signals_to_proto(None) == rollout_pb2.VersionSignals()


def test_a_status_converts_whole():
    view = StatusView(
        stable="policy-0002", canary="policy-0004", canary_share=0.1, canary_since=100.0, queued="policy-0005",
        paused=True, mode="manual", sequence=7,
        last_verdict=VerdictView("continue", "collecting evidence", {"alpha_per_signal": 0.05}, 101.0),
        stable_signals=SignalsView("policy-0002", {"thumbs": 3, "thumbs_up_rate": 2 / 3}),
        canary_signals=SignalsView("policy-0004", {"thumbs": 1, "thumbs_up_rate": 1.0}),
        recent=[STEP], latest_candidate="policy-0005",
    )  # fmt: skip
    msg = status_to_proto(view)
    assert (msg.stable, msg.canary, msg.canary_share, msg.queued, msg.paused, msg.mode, msg.sequence) == (
        "policy-0002",
        "policy-0004",
        0.1,
        "policy-0005",
        True,
        "manual",
        7,
    )
    assert msg.last_verdict.action == "continue" and json.loads(msg.last_verdict.evidence_json) == {
        "alpha_per_signal": 0.05
    }
    assert msg.stable_signals.thumbs == 3 and msg.canary_signals.thumbs_up_rate == 1.0
    assert [s.sequence for s in msg.recent] == [3] and msg.latest_candidate == "policy-0005"


def test_a_service_still_rebuilding_its_state_is_unavailable():
    servicer = RolloutServicer(lambda: None)
    with pytest.raises(Unavailable, match="rebuilding"):
        asyncio.run(servicer.Status(rollout_pb2.RolloutStatusRequest(), None))
    with pytest.raises(Unavailable):
        asyncio.run(servicer.Promote(rollout_pb2.RolloutVersionRequest(version="policy-0002"), None))
