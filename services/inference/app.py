"""Wiring of the inference service: config -> engine, store, Kafka -> gRPC server.

``InferenceApp`` is what ``python -m services.inference`` runs and what the tests start in-process.
"""

from __future__ import annotations

import asyncio

from services.inference.access import INFERENCE_ACCESS
from services.inference.config import InferenceConfig
from services.inference.engine import VllmEngine
from services.inference.servicer import InferenceServicer
from services.inference.serving import InferenceServing
from shared.grpc_server import GrpcServer
from shared.kafka.publishers import KafkaPublisher, Outbox
from shared.kafka.readers import TopicFollower
from shared.logging import get_logger
from shared.model_store import ModelStore
from shared.pb import inference_pb2_grpc
from shared.version_line import POLICY, POLICY_KINDS

log = get_logger(__name__)


class InferenceApp:
    def __init__(self, cfg: InferenceConfig):
        self.cfg = cfg
        self.publisher = Outbox(KafkaPublisher(cfg.kafka, "inference")) if cfg.kafka.servers else None
        self.serving = InferenceServing(cfg, VllmEngine(cfg), ModelStore(cfg.model_store.root), self.publisher)
        self.server = GrpcServer(
            "InferenceService",
            cfg.host,
            cfg.grpc_port,
            auth=cfg.auth,
            access=[INFERENCE_ACCESS],
            grace_period_s=cfg.grace_period_s,
            health_port=cfg.health_port,
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.serving), self.server.server)

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        """Listen (NOT_SERVING), load the policy, follow updates, then report SERVING."""
        await self.server.start()
        follow = self.cfg.follow_updates and bool(self.cfg.kafka.servers)
        if follow:
            # Position on the update topic before reading the store's current version, so that an
            # update published in between is not missed.
            topic = POLICY_KINDS[self.cfg.follow].topic  # the followed pointer's announcements
            reader = await asyncio.to_thread(TopicFollower, self.cfg.kafka, "inference", topic)
            self.serving.versions.subscribe(reader)
        await self.serving.start()
        if follow:
            self.serving.versions.start()
        await self.server.set_serving()

    async def stop(self) -> None:
        await self.server.stop()
        await asyncio.to_thread(self.serving.versions.stop)
        if self.publisher:
            await asyncio.to_thread(self.publisher.close, 10)
        await self.serving.close()
