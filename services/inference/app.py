"""Wiring of the inference service: config -> engine, store, Kafka -> gRPC server.

``InferenceApp`` is what ``python -m services.inference`` runs and what the tests start in-process.
With RLHF_INFERENCE_SWAP_LEASE_DIR the replica is one of a group that swaps one replica at a time
(serving.InferenceServing.rolling_swap); it reports whether clients should route to it on the health
service ``rlhf.v1.InferenceService`` (ROUTING_HEALTH_SERVICE), which the gateway's channels watch.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from services.inference.access import INFERENCE_ACCESS
from services.inference.config import OUTBOX_SEGMENT_MB, InferenceConfig, outbox_spill_dir
from services.inference.engine import VllmEngine
from services.inference.servicer import InferenceServicer
from services.inference.serving import InferenceServing
from services.inference.swap_lease import SwapLease, holder_id
from shared.grpc_server import GrpcServer
from shared.kafka.publishers import KafkaPublisher, Outbox
from shared.kafka.readers import TopicFollower
from shared.logging import get_logger
from shared.model_store import ModelStore
from shared.pb import inference_pb2_grpc
from shared.version_line import POLICY, POLICY_CANARY, POLICY_KINDS

log = get_logger(__name__)

ROUTING_HEALTH_SERVICE = "rlhf.v1.InferenceService"
"""The health service name whose status says whether clients should send this replica new requests
(NOT_SERVING during a rolling swap); "" stays SERVING then, for the kubelet's probes."""


class InferenceApp:
    def __init__(self, cfg: InferenceConfig):
        self.cfg = cfg
        self.server = GrpcServer(
            "InferenceService",
            cfg.host,
            cfg.grpc_port,
            auth=cfg.auth,
            access=[INFERENCE_ACCESS],
            grace_period_s=cfg.grace_period_s,
            health_port=cfg.health_port,
            max_concurrent_rpcs=cfg.grpc_max_concurrent_rpcs,
        )
        self.publisher = self._outbox() if cfg.kafka.servers else None
        self.serving = InferenceServing(cfg, VllmEngine(cfg), ModelStore(cfg.model_store.root), self.publisher)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.serving), self.server.server)
        if cfg.swap_lease_dir is not None:
            group = cfg.follow  # current or canary: replicas of one group share a lease
            self.serving.lease = SwapLease(
                cfg.swap_lease_dir, f"{POLICY.name}.{group}", holder_id(), cfg.swap_lease_ttl_s
            )
            self.serving.set_routable = self._set_routable

    def _outbox(self) -> Outbox:
        """Completion events go out through a spill journal (this replica's, by its port): what a
        killed replica had accepted is sent when it starts again. A replica on an ephemeral port
        (RLHF_INFERENCE_GRPC_PORT=0, tests) could never be found again: its events wait in memory."""
        cfg = self.cfg
        return Outbox(
            KafkaPublisher(cfg.kafka, "inference"),
            spill_dir=outbox_spill_dir(cfg, cfg.grpc_port) if cfg.grpc_port else None,
            spill_max_bytes=cfg.outbox_spill_max_mb << 20,
            spill_segment_bytes=OUTBOX_SEGMENT_MB << 20,
            max_attempts=cfg.outbox_max_attempts,
        )

    async def _set_routable(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.server.health.set(ROUTING_HEALTH_SERVICE, status)

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
            if self.serving.beside is not None:  # the canary pointer too, held beside (LoRA)
                beside = await asyncio.to_thread(TopicFollower, self.cfg.kafka, "inference", POLICY_CANARY.topic)
                self.serving.beside.subscribe(beside)
        await self.serving.start()
        if follow:
            self.serving.versions.start()
            if self.serving.beside is not None:
                self.serving.beside.start()
        await self.server.set_serving()

    async def stop(self) -> None:
        self.serving.stopping.set()  # a swap waiting for its group's lease gives up
        await self.server.stop()
        await asyncio.to_thread(self.serving.versions.stop)
        if self.serving.beside is not None:
            await asyncio.to_thread(self.serving.beside.stop)
        if self.publisher:
            await asyncio.to_thread(self.publisher.close, 10)
        await self.serving.close()
