"""Wiring of the reward service: config -> model store, Kafka -> scorer -> gRPC server.

``RewardApp`` is what ``python -m services.reward`` runs and what the tests start in-process.
Health reports NOT_SERVING until a reward model version has been verified and loaded. With Kafka
configured (and follow_updates on) it follows rlhf.reward-models and hot-swaps to each announced
version; a version that does not verify is refused and the old one keeps scoring. With Kafka and
RLHF_REWARD_LEARNER on (the default) it also runs the continual learner on its own thread
(learner.py): live ratings -> gated new RM versions, which the scorer here loads at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

from services.reward.access import REWARD_ACCESS
from services.reward.config import RewardConfig
from services.reward.scorer import RewardScorer
from services.reward.servicer import RewardServicer
from shared.grpc_server import GrpcServer
from shared.kafka.publishers import KafkaPublisher
from shared.kafka.readers import TopicFollower
from shared.logging import get_logger, log_event
from shared.model_store import ModelStore
from shared.pb import reward_pb2_grpc
from shared.retention import RetentionRule, RetentionSweeper
from shared.store_identity import identity_of
from shared.version_line import REWARD_MODEL, KafkaAnnouncer, VersionLine

if TYPE_CHECKING:  # imported when the learner starts (it brings the training stack)
    from services.reward.retraining import RetrainingLoop, RetrainingThread

log = get_logger(__name__)


class RewardApp:
    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.store = ModelStore(cfg.model_store.root, cfg.model_store.digest)
        self.scorer = RewardScorer(cfg, self.store)
        self.server = GrpcServer(
            "RewardService",
            cfg.host,
            cfg.grpc_port,
            auth=cfg.auth,
            access=[REWARD_ACCESS],
            grace_period_s=cfg.grace_period_s,
            health_port=cfg.health_port,
            max_concurrent_rpcs=cfg.grpc_max_concurrent_rpcs,
        )
        reward_pb2_grpc.add_RewardServiceServicer_to_server(
            RewardServicer(self.scorer, learner=lambda: self.learner), self.server.server
        )
        self.learner: RetrainingLoop | None = None  # when RLHF_REWARD_LEARNER is on and Kafka is set
        self._learner_thread: RetrainingThread | None = None
        self._publisher: KafkaPublisher | None = None
        self._retention: RetentionSweeper | None = None

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        """Listen (NOT_SERVING), load the reward model (training the first one if configured),
        follow announcements, then report SERVING."""
        if self.cfg.torch_threads:
            import torch

            torch.set_num_threads(self.cfg.torch_threads)
        await self.server.start()
        follow = self.cfg.follow_updates and bool(self.cfg.kafka.servers)
        if follow:
            # Position on the topic before reading the store's current version: nothing is missed.
            reader = await asyncio.to_thread(TopicFollower, self.cfg.kafka, "reward", REWARD_MODEL.topic)
            self.scorer.versions.subscribe(reader)
        if not self.cfg.rm_version and not self.store.versions("rm") and self.cfg.bootstrap_rankings:
            await asyncio.to_thread(self._bootstrap)
        await asyncio.to_thread(self.scorer.load, self.cfg.rm_version or None)
        if follow:
            self.scorer.versions.start()
        if self.cfg.learner and self.cfg.kafka.servers:
            await asyncio.to_thread(self._start_learner)
        elif self.cfg.learner:
            log_event(log, "continual learner off: no Kafka (RLHF_KAFKA_BOOTSTRAP_SERVERS) to read ratings from")
        await self.server.set_serving()

    def _start_learner(self) -> None:
        from services.reward.ratings_feed import RatingsFeed
        from services.reward.retraining import RetrainingLoop, RetrainingThread
        from services.reward.retraining_state import RetrainingState

        state = RetrainingState(self.cfg.state_dir / "learner.sqlite3", store_id=identity_of(self.store.root))
        self._publisher = KafkaPublisher(self.cfg.kafka, "reward").connect()
        # The learner owns the rm line: it publishes, and announces once each version is stored.
        line = VersionLine(
            self.store,
            REWARD_MODEL,
            KafkaAnnouncer(self._publisher, REWARD_MODEL),
            signer=self.cfg.versions.signer("rm"),
        )
        # The scorer beside the learner swaps at once; other replicas follow the announcement.
        self.learner = RetrainingLoop(
            self.cfg, self.store, state, line=line, on_published=lambda version: self.scorer.load(version)
        )
        # A version published before a restart (or offline, by rlhf bootstrap) and never announced.
        line.announce_pending()
        feed = RatingsFeed(
            self.cfg.kafka, state.offsets(), identities=state.identities(), adopt_identities=state.adopt_identities
        )
        self._learner_thread = RetrainingThread(self.learner, feed)
        self._learner_thread.start()
        # The learner publishes the rm line, so it sweeps it (shared/retention.py; the trainer pins
        # the reward models it loads).
        self._retention = RetentionSweeper(self.store, "rm", RetentionRule.of(self.cfg.model_store)).start(
            self.cfg.model_store.retention_interval_s
        )
        log_event(log, "continual learner started", state=str(state.path), **state.counts())

    def _bootstrap(self) -> None:
        from services.reward.offline import OFFLINE_SETTINGS, train_first_rm

        log_event(
            log, "no reward model in the store: training the first one", rankings=str(self.cfg.bootstrap_rankings)
        )
        assert self.cfg.bootstrap_rankings is not None  # start() bootstraps only when it is set
        # Trained on sequences cut exactly as this service will cut the ones it scores.
        settings = dataclasses.replace(OFFLINE_SETTINGS, limits=self.scorer.limits)
        train_first_rm(
            self.store, self.cfg.bootstrap_rankings, settings=settings, signer=self.cfg.versions.signer("rm")
        )

    async def stop(self) -> None:
        await self.server.stop()
        if self._retention is not None:
            await asyncio.to_thread(self._retention.stop)
        if self._learner_thread is not None:
            await asyncio.to_thread(self._learner_thread.stop)
            assert self.learner is not None  # started before its thread
            self.learner.state.close()
        if self._publisher is not None:
            await asyncio.to_thread(self._publisher.close)
        await asyncio.to_thread(self.scorer.versions.close)
