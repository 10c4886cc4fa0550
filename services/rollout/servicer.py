"""gRPC RolloutService: converts protobuf messages to RolloutServing's calls and back, nothing more."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any

import grpc

from services.rollout.domain import SignalsView, StatusView, VerdictView
from services.rollout.serving import RolloutServing
from shared.errors import Unavailable
from shared.events import RolloutEvent
from shared.pb import rollout_pb2, rollout_pb2_grpc


def evidence_json(evidence: dict[str, Any]) -> str:
    """Evidence as compact JSON (non-finite numbers as null, anything else as its text)."""
    return json.dumps(_finite(evidence), separators=(",", ":"), sort_keys=True, default=str)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def signals_to_proto(view: SignalsView | None) -> rollout_pb2.VersionSignals:
    if view is None:
        return rollout_pb2.VersionSignals()
    s = view.summary

    def num(name: str) -> float:
        value = s.get(name)
        return float(value) if value is not None else 0.0

    return rollout_pb2.VersionSignals(
        version=view.version,
        thumbs_up_rate=num("thumbs_up_rate"),
        thumbs=int(s.get("thumbs") or 0),
        likert_mean=num("likert_mean"),
        likerts=int(s.get("likerts") or 0),
        completions=int(s.get("completions") or 0),
        error_rate=num("error_rate"),
        latency_p50_s=num("latency_p50_s"),
        latency_p90_s=num("latency_p90_s"),
        mean_tokens=num("mean_tokens"),
    )


def verdict_to_proto(v: VerdictView | None) -> rollout_pb2.GateVerdict:
    if v is None:
        return rollout_pb2.GateVerdict()
    return rollout_pb2.GateVerdict(action=v.action, reason=v.reason, evidence_json=evidence_json(v.evidence), at=v.at)


def step_to_proto(ev: RolloutEvent) -> rollout_pb2.RolloutStep:
    return rollout_pb2.RolloutStep(
        sequence=ev.sequence,
        version=ev.version,
        stage=ev.stage,
        reason=ev.reason,
        stable=ev.stable,
        canary=ev.canary,
        canary_share=ev.canary_share,
        at=ev.at,
        evidence_json=evidence_json(ev.evidence),
    )


def status_to_proto(s: StatusView) -> rollout_pb2.RolloutStatus:
    return rollout_pb2.RolloutStatus(
        stable=s.stable,
        canary=s.canary,
        canary_share=s.canary_share,
        canary_since=s.canary_since,
        queued=s.queued,
        paused=s.paused,
        mode=s.mode,
        sequence=s.sequence,
        last_verdict=verdict_to_proto(s.last_verdict),
        stable_signals=signals_to_proto(s.stable_signals),
        canary_signals=signals_to_proto(s.canary_signals),
        recent=[step_to_proto(ev) for ev in s.recent],
        latest_candidate=s.latest_candidate,
    )


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, get_serving: Callable[[], RolloutServing | None]):
        self._get_serving = get_serving

    def _serving(self) -> RolloutServing:
        serving = self._get_serving()
        if serving is None:
            raise Unavailable("the rollout service is still rebuilding its state")
        return serving

    async def _command(self, call: Callable[[RolloutServing], object]) -> rollout_pb2.RolloutStatus:
        serving = self._serving()
        await asyncio.to_thread(call, serving)  # waits for Kafka's acknowledgement of the step
        return status_to_proto(serving.status())

    async def Status(
        self, request: rollout_pb2.RolloutStatusRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        return status_to_proto(self._serving().status())

    async def Promote(
        self, request: rollout_pb2.RolloutVersionRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        return await self._command(lambda s: s.promote(request.version))

    async def Rollback(
        self, request: rollout_pb2.RolloutVersionRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        return await self._command(lambda s: s.rollback(request.version))

    async def Pause(
        self, request: rollout_pb2.RolloutPauseRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        return await self._command(lambda s: s.pause())

    async def Resume(
        self, request: rollout_pb2.RolloutResumeRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        return await self._command(lambda s: s.resume())

    async def SetMode(
        self, request: rollout_pb2.RolloutModeRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        return await self._command(lambda s: s.set_mode(request.mode))
