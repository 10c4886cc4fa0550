"""gRPC TrainerService: converts protobuf messages to the training loop's calls and back, nothing more."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import grpc

from services.trainer.loop import GateResult, StatusSnapshot, TrainingLoop
from shared.errors import Unavailable
from shared.pb import common_pb2, trainer_pb2, trainer_pb2_grpc


def gate_to_proto(r: GateResult) -> trainer_pb2.PublishResult:
    version = common_pb2.ModelVersion(
        version=r.version, parent=r.parent, published_at=r.published_at, metrics=r.metrics
    )
    return trainer_pb2.PublishResult(
        published=r.published,
        version=version,
        reason=r.reason,
        heldout_reward=r.heldout_reward,
        kl=r.kl,
        baseline_reward=r.baseline_reward,
        step=r.step,
        guards=[
            trainer_pb2.GuardCheck(
                name=g["name"],
                passed=g["ok"],
                value=math.nan if g["value"] is None else g["value"],
                baseline=g.get("baseline"),
                bar=g.get("bar"),
                reason=g["reason"],
            )
            for g in r.guards
        ],
        refused_by=r.refused_by,
        compared=r.compared,
        same_as_baseline=r.same_as_baseline,
    )


def status_to_proto(s: StatusSnapshot) -> trainer_pb2.TrainerStatus:
    msg = trainer_pb2.TrainerStatus(
        step=s.step,
        paused=s.paused,
        base_policy_version=s.base_policy_version,
        mean_reward=s.mean_reward,
        kl=s.kl,
        entropy=s.entropy,
        state=s.state,
        detail=s.detail,
        reference_policy_version=s.reference_policy_version,
        rm_version=s.rm_version,
        checkpoint_step=s.checkpoint_step,
        live_prompts=s.live_prompts,
        dropped_rollouts=s.dropped_rollouts,
        baseline_reward=s.baseline_reward,
    )
    if s.last_published:
        p = s.last_published
        msg.last_published.CopyFrom(
            common_pb2.ModelVersion(
                version=p["version"], parent=p.get("parent") or "", published_at=p["published_at"], metrics=p["metrics"]
            )
        )
    if s.last_gate:
        msg.last_gate.CopyFrom(gate_to_proto(s.last_gate))
    return msg


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, get_loop: Callable[[], TrainingLoop | None]):
        self._get_loop = get_loop

    def _loop(self) -> TrainingLoop:
        loop = self._get_loop()
        if loop is None:
            raise Unavailable("the trainer is still loading its models")
        return loop

    async def Status(
        self, request: trainer_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.TrainerStatus:
        return status_to_proto(self._loop().status())

    async def Pause(
        self, request: trainer_pb2.PauseRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.TrainerStatus:
        loop = self._loop()
        loop.pause()
        return status_to_proto(loop.status())

    async def Resume(
        self, request: trainer_pb2.ResumeRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.TrainerStatus:
        loop = self._loop()
        loop.resume()
        return status_to_proto(loop.status())

    async def PublishNow(
        self, request: trainer_pb2.PublishNowRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.PublishResult:
        return gate_to_proto(await asyncio.to_thread(self._loop().publish_now))

    async def Rollback(
        self, request: trainer_pb2.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.PublishResult:
        return gate_to_proto(await asyncio.to_thread(self._loop().rollback, request.policy_version))
