"""gRPC RewardService: converts protobuf messages to domain objects and back, nothing more."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from services.reward.domain import RaterRecord, ScoreItem
from services.reward.scorer import RewardScorer
from shared.errors import FailedPrecondition, InvalidArgument
from shared.events import Message
from shared.pb import common_pb2, reward_pb2, reward_pb2_grpc

if TYPE_CHECKING:  # the retraining loop brings the training stack; only its type is needed here
    from services.reward.retraining import RetrainingLoop

MAX_RATERS_LISTED = 1000


def items_from_proto(msg: reward_pb2.ScoreRequest) -> list[ScoreItem]:
    return [ScoreItem([Message(m.role, m.content) for m in it.messages], it.response) for it in msg.items]


def rater_to_proto(r: RaterRecord) -> reward_pb2.Rater:
    return reward_pb2.Rater(
        principal=r.principal,
        status=r.status,
        reason=r.reason,
        peer_agreement=r.peer_agreement,
        peer_items=r.peer_items,
        rm_agreement=r.rm_agreement,
        rm_items=r.rm_items,
        comparisons=r.comparisons,
        updated_at=r.updated_at,
        status_at=r.status_at,
    )


def raters_limit(limit: int) -> int:
    """The request's limit: 0 means 100; otherwise 1 to MAX_RATERS_LISTED."""
    if limit == 0:
        return 100
    if not 1 <= limit <= MAX_RATERS_LISTED:
        raise InvalidArgument(f"limit must be 0 (default 100) or 1 to {MAX_RATERS_LISTED}, not {limit}", param="limit")
    return limit


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, scorer: RewardScorer, learner: Callable[[], RetrainingLoop | None] = lambda: None):
        self.scorer = scorer
        self.learner = learner
        """The retraining loop of this replica, once started (None: it runs elsewhere or not at all)."""

    async def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        result = await self.scorer.score(items_from_proto(request))
        return reward_pb2.ScoreResponse(scores=result.scores, rm_version=result.rm_version, truncated=result.truncated)

    async def GetRewardModel(
        self, request: reward_pb2.GetRewardModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelVersion:
        info = self.scorer.info()
        return common_pb2.ModelVersion(
            version=info.version, parent=info.parent or "", published_at=info.published_at, metrics=info.metrics
        )

    async def ListRaters(
        self, request: reward_pb2.ListRatersRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ListRatersResponse:
        limit = raters_limit(request.limit)
        listed = await asyncio.to_thread(self._loop().list_raters, request.quarantined_only, limit)
        return reward_pb2.ListRatersResponse(
            raters=[rater_to_proto(r) for r in listed.raters],
            total=listed.total,
            quarantined=listed.quarantined,
            held_back=listed.held_back,
        )

    async def ReleaseRater(
        self, request: reward_pb2.ReleaseRaterRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.Rater:
        if not request.principal:
            raise InvalidArgument("principal is required", param="principal")
        return rater_to_proto(await asyncio.to_thread(self._loop().release_rater, request.principal))

    def _loop(self) -> RetrainingLoop:
        loop = self.learner()
        if loop is None:
            raise FailedPrecondition(
                "this reward replica does not run the retraining loop (RLHF_REWARD_LEARNER off, or no Kafka): "
                "ask the replica that does"
            )
        return loop
