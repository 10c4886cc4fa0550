"""Wiring of the rollout service: config -> Kafka, model store, signing key -> RolloutServing ->
gRPC server, candidate follower, evidence feed, gate thread.

``RolloutApp`` is what ``python -m services.rollout`` runs and what the tests start in-process.

Start (health NOT_SERVING until the end): listen -> connect the publisher -> rebuild the state
from every step on rlhf.rollout (a first start: the store's current policy is stable, waiting for
one) -> subscribe to rlhf.policy-candidates at its end -> restore the pointers (current = stable,
canary = canary or stable; moved and announced only where they differ) -> position the evidence
feed on rlhf.feedback and rlhf.completions at the canary's start -> take the candidate the store
records (so that one announced while this service was down is not missed) -> follow candidates
-> read the evidence up to where it was at start -> the gate thread -> SERVING.

Stop (SIGTERM): stop answering, stop the gate thread (a step in flight is finished and
acknowledged first), stop the followers, close the publisher.
"""

from __future__ import annotations

import asyncio
import threading
import time

from services.rollout import metrics
from services.rollout.access import ROLLOUT_ACCESS
from services.rollout.config import RolloutConfig
from services.rollout.feeds import EvidenceFeed, read_history
from services.rollout.lifecycle import RolloutState
from services.rollout.pointers import LinePointers
from services.rollout.servicer import RolloutServicer
from services.rollout.serving import CandidateCheck, RolloutServing
from shared.events import RolloutEvent
from shared.grpc_server import GrpcServer
from shared.kafka.envelope import Envelope
from shared.kafka.publishers import KafkaPublisher
from shared.kafka.readers import Record, TopicFollower
from shared.kafka.topics import POLICY_CANDIDATES, ROLLOUT
from shared.logging import get_logger, log_event
from shared.model_store import ModelStore
from shared.pb import rollout_pb2_grpc
from shared.version_line import POLICY, POLICY_CANDIDATE, VersionLine

log = get_logger(__name__)

ROLLOUT_KEY = "policy"
"""Kafka key of every step on rlhf.rollout (one partition; the order of the decisions)."""


class RolloutApp:
    def __init__(self, cfg: RolloutConfig):
        self.cfg = cfg
        self.store = ModelStore(cfg.model_store.root)
        self.serving: RolloutServing | None = None
        self.server = GrpcServer(
            "RolloutService",
            cfg.host,
            cfg.grpc_port,
            auth=cfg.auth,
            access=[ROLLOUT_ACCESS],
            grace_period_s=cfg.grace_period_s,
            health_port=cfg.health_port,
            max_concurrent_rpcs=cfg.grpc_max_concurrent_rpcs,
        )
        rollout_pb2_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(lambda: self.serving), self.server.server)
        self._stop = threading.Event()
        self._publisher: KafkaPublisher | None = None
        self._candidates: TopicFollower | None = None
        self._feed: EvidenceFeed | None = None
        self._ticker: threading.Thread | None = None

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        await self.server.start()
        self._publisher = await asyncio.to_thread(KafkaPublisher(self.cfg.kafka, "rollout").connect)
        # Building may wait for the first policy: a SIGTERM meanwhile ends start early.
        build = asyncio.ensure_future(asyncio.to_thread(self._build))
        stop_requested = asyncio.ensure_future(self.server.wait_for_stop_request())
        await asyncio.wait({build, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if not build.done():
            self._stop.set()
            try:
                await build
            except RuntimeError:
                log_event(log, "stopped before the rollout state was rebuilt")
                return
        stop_requested.cancel()
        serving = build.result()
        assert self._feed is not None and self._candidates is not None

        def on_candidate(env: Envelope, _record: Record) -> None:
            serving.offer_candidate(env.payload)

        self._candidates.start_thread(on_candidate, "rollout-candidates")
        self._feed.start(serving.on_evidence)
        while not self._feed.caught_up.is_set():
            await asyncio.sleep(0.05)
        self.serving = serving
        self._ticker = threading.Thread(target=self._tick, args=(serving,), name="rollout-gate", daemon=True)
        self._ticker.start()
        log_event(log, "rollout service ready", stable=serving.state.stable, canary=serving.state.canary or "-")
        await self.server.set_serving()

    def _build(self) -> RolloutServing:
        cfg = self.cfg
        history = read_history(cfg.kafka, stop=self._stop)
        first = history[0].stable if history else self._wait_for_policy()
        state = RolloutState(first, mode=cfg.initial_mode)
        for ev in history:
            state.apply(ev)
        keys = cfg.versions.verify_keys("policy")
        assert self._publisher is not None
        pointers = LinePointers(self.store, self._publisher, signer=cfg.versions.signer("policy"))
        check = CandidateCheck(VersionLine(self.store, POLICY_CANDIDATE, keys=keys))
        serving = RolloutServing(
            state,
            cfg.gate_settings(),
            canary_share=cfg.canary_share,
            pointers=pointers,
            publish=self._emit,
            check=check,
            history=history,
            max_votes=cfg.max_votes,
            recent_steps=cfg.recent_steps,
            announce_owed=pointers.announce_owed,
        )
        log_event(log, "rollout steps read back", steps=len(history), sequence=state.sequence)
        # Subscribe before reading the store's candidate record: one announced in between is not missed.
        self._candidates = TopicFollower(cfg.kafka, "rollout", POLICY_CANDIDATES)
        serving.restore()
        self._feed = EvidenceFeed(cfg.kafka, since=state.canary_since if state.canary else None)
        recorded = check.recorded()
        if recorded is not None:
            serving.offer_candidate(recorded)
        return serving

    def _wait_for_policy(self) -> str:
        """The stable version of a first start: the policy line's authenticated current record (or,
        without verify keys, the current pointer); waits until the store holds a policy."""
        line = VersionLine(self.store, POLICY, keys=self.cfg.versions.verify_keys("policy"))
        while not self._stop.is_set():
            record = line.trusted_record(required=False)
            version = record.version if record else (None if line.enforced else self.store.current("policy"))
            if version:
                log_event(log, "first start: the current policy is the stable version", version=version)
                return version
            log_event(log, "waiting for a policy in the store", root=str(self.store.root))
            self._stop.wait(5.0)
        raise RuntimeError("stopped while waiting for a policy")

    def _emit(self, ev: RolloutEvent) -> None:
        """Publish a step and wait for Kafka's acknowledgement, retrying until it comes: nothing is
        acted on before its step is durable (a stop request while Kafka is down gives up)."""
        assert self._publisher is not None
        delay = 0.5
        while True:
            try:
                self._publisher.publish_and_wait(ROLLOUT, ev, key=ROLLOUT_KEY)
                return
            except Exception as exc:  # any producer error: retried, the step is not acted on meanwhile
                metrics.EMIT_FAILURES.inc()
                log_event(
                    log,
                    "rollout step not acknowledged; retrying",
                    level=30,
                    sequence=ev.sequence,
                    stage=ev.stage,
                    error=f"{type(exc).__name__}: {exc}",
                )
                if self._stop.wait(delay):
                    raise RuntimeError(f"stopped before step {ev.sequence} was acknowledged") from exc
                delay = min(delay * 2, 10.0)

    def _tick(self, serving: RolloutServing) -> None:
        while not self._stop.wait(self.cfg.tick_s):
            started = time.monotonic()
            try:
                serving.tick()
            except Exception:  # the gate thread must not die; the next tick retries
                log.exception("gate tick failed")
            if time.monotonic() - started > 5 * self.cfg.tick_s:
                log_event(log, "slow gate tick", level=30, seconds=round(time.monotonic() - started, 2))

    async def stop(self) -> None:
        await self.server.stop()
        self._stop.set()
        if self._ticker is not None:
            await asyncio.to_thread(self._ticker.join, 30)
        if self._candidates is not None:
            await asyncio.to_thread(self._candidates.stop_thread)
        if self._feed is not None:
            await asyncio.to_thread(self._feed.stop)
        if self._publisher is not None:
            await asyncio.to_thread(self._publisher.close)
        log_event(log, "rollout service stopped")
