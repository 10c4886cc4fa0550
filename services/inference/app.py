"""Wiring of the inference service: config -> engine, store, Kafka -> gRPC server.

``InferenceApp`` is what ``python -m services.inference`` runs and what the tests start in-process.
"""

from __future__ import annotations

import asyncio

from services.inference.config import InferenceConfig
from services.inference.engine import VllmEngine
from services.inference.servicer import InferenceServicer
from services.inference.serving import InferenceServing
from shared.events import PolicyUpdateEvent
from shared.grpc_server import GrpcServer
from shared.kafka.consumer import TopicFollower
from shared.kafka.producer import EventPublisher
from shared.kafka.topics import POLICY_UPDATES
from shared.logging import get_logger
from shared.model_store import ModelStore
from shared.pb import inference_pb2_grpc

log = get_logger(__name__)


class InferenceApp:
    def __init__(self, cfg: InferenceConfig):
        self.cfg = cfg
        self.publisher = EventPublisher(cfg.kafka, "inference") if cfg.kafka.servers else None
        self.serving = InferenceServing(cfg, VllmEngine(cfg), ModelStore(cfg.model_store.root), self.publisher)
        self.server = GrpcServer("InferenceService", cfg.host, cfg.grpc_port, grace_period_s=cfg.grace_period_s)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.serving), self.server.server)
        self.follower: TopicFollower | None = None

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        """Listen (NOT_SERVING), load the policy, follow updates, then report SERVING."""
        await self.server.start()
        if self.cfg.follow_updates and self.cfg.kafka.servers:
            # Position on the update topic before reading the store's current version, so that an
            # update published in between is not missed.
            self.follower = await asyncio.to_thread(TopicFollower, self.cfg.kafka, "inference", POLICY_UPDATES)
        await self.serving.start()
        if self.follower is not None:
            loop = asyncio.get_running_loop()

            def on_update(env, record) -> None:
                if isinstance(env.payload, PolicyUpdateEvent):
                    asyncio.run_coroutine_threadsafe(self.serving.apply_update(env.payload), loop).result()

            self.follower.start_thread(on_update, "policy-updates")
        await self.server.set_serving()

    async def stop(self) -> None:
        await self.server.stop()
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop_thread)
        if self.publisher:
            await asyncio.to_thread(self.publisher.close, 10)
        await self.serving.close()
