"""gRPC RewardService: converts protobuf messages to domain objects and back, nothing more."""

from __future__ import annotations

import grpc

from services.reward.domain import ScoreItem
from services.reward.scorer import RewardScorer
from shared.events import Message
from shared.pb import common_pb2, reward_pb2, reward_pb2_grpc


def items_from_proto(msg: reward_pb2.ScoreRequest) -> list[ScoreItem]:
    return [ScoreItem([Message(m.role, m.content) for m in it.messages], it.response) for it in msg.items]


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, scorer: RewardScorer):
        self.scorer = scorer

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
