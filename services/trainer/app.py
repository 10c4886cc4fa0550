"""Wiring of the trainer service: config -> prompts, clients, learner, checkpoints -> training
thread + gRPC control server.

``TrainerApp`` is what ``python -m services.trainer`` runs and what the tests start in-process.

Start: listen (health NOT_SERVING) -> follow user prompts on rlhf.completions (consumer group) ->
wait until the store holds a policy and a reward model -> resume from the newest complete
checkpoint, or start from the current policy -> health SERVING -> the training thread runs
``TrainingLoop.run`` (paused if configured; yielding rollouts to users by inference's GetLoad,
user_load.py). Stop: stop answering, let the iteration in progress finish, write a final
checkpoint, leave the consumer group, close the clients.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import grpc

from services.trainer.access import TRAINER_ACCESS
from services.trainer.checkpoint import CheckpointStore, LoadedCheckpoint, missing_versions
from services.trainer.config import TrainerConfig
from services.trainer.guards import Guard, GuardConfigError, build_guards
from services.trainer.learner import PPOLearner, checkpoint_mismatch
from services.trainer.loop import LoopSettings, LoopState, TrainingLoop, restore
from services.trainer.metrics import LIVE_PROMPTS, LIVE_PROMPTS_BUFFERED, LIVE_PROMPTS_LARGEST_SHARE
from services.trainer.prompts import LivePromptBuffer, PromptMixer, read_prompt_file, split_heldout_prompts
from services.trainer.publishing import PolicyPublisher
from services.trainer.rollout_collector import GrpcPolicySampler, GrpcRewardScorer, RolloutCollector
from services.trainer.servicer import TrainerServicer
from services.trainer.user_load import GrpcLoadProbe, UserLoadGovernor
from shared.config import ConfigError
from shared.events import CompletionEvent
from shared.grpc_channels import ClientCredentials, sync_channel
from shared.grpc_server import GrpcServer
from shared.kafka.envelope import Envelope
from shared.kafka.publishers import KafkaPublisher
from shared.kafka.readers import GroupReader, Record
from shared.kafka.topics import COMPLETIONS
from shared.logging import get_logger, log_event
from shared.model_store import ModelStore, ModelStoreError
from shared.pb import trainer_pb2_grpc
from shared.retention import RetentionRule, RetentionSweeper, pin_versions
from shared.store_identity import identity_of
from shared.version_line import POLICY, POLICY_CANDIDATE, KafkaAnnouncer

log = get_logger(__name__)


class TrainerApp:
    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.store = ModelStore(cfg.model_store.root, cfg.model_store.digest)
        self.checkpoints = CheckpointStore(
            cfg.checkpoint_root(), keep=cfg.checkpoints_kept, store_id=identity_of(cfg.model_store.root)
        )
        self.heldout, self.train_prompts = split_heldout_prompts(read_prompt_file(cfg.prompt_file), cfg.heldout_prompts)
        self.live = LivePromptBuffer(
            cfg.live_prompt_buffer,
            exclude=self.heldout,
            max_principal_share=cfg.max_principal_share,
            min_principal_prompts=cfg.min_principal_prompts,
        )
        self.loop: TrainingLoop | None = None
        self.server = GrpcServer(
            "TrainerService",
            cfg.host,
            cfg.grpc_port,
            auth=cfg.auth,
            access=[TRAINER_ACCESS],
            grace_period_s=cfg.grace_period_s,
            health_port=cfg.health_port,
            max_concurrent_rpcs=cfg.grpc_max_concurrent_rpcs,
        )
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(lambda: self.loop), self.server.server)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._channels: list[grpc.Channel] = []
        self._consumer: GroupReader | None = None
        self._publisher: KafkaPublisher | None = None
        self._retention: RetentionSweeper | None = None

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        if self.cfg.torch_threads:
            import torch

            torch.set_num_threads(self.cfg.torch_threads)
        await self.server.start()
        if self.cfg.live_prompt_fraction > 0:
            self._consumer = await asyncio.to_thread(
                GroupReader, self.cfg.kafka, "trainer", self.cfg.consumer_group, [COMPLETIONS]
            )
            self._start_thread(self._consumer.run, "trainer-prompts", self._on_completion, self._stop)
        self._publisher = await asyncio.to_thread(KafkaPublisher(self.cfg.kafka, "trainer").connect)
        # Loading may wait a long time for a reward model to appear: a SIGTERM meanwhile ends start
        # early (health stays NOT_SERVING) instead of being ignored until the models arrive.
        build = asyncio.ensure_future(asyncio.to_thread(self._build_loop))
        stop_requested = asyncio.ensure_future(self.server.wait_for_stop_request())
        await asyncio.wait({build, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if not build.done():
            self._stop.set()
            try:
                await build
            except RuntimeError:
                log_event(log, "stopped before the models were loaded")
                return
        stop_requested.cancel()
        self.loop = build.result()
        self._start_retention()
        self._start_thread(self.loop.run, "trainer-loop", self._stop)
        await self.server.set_serving()

    def _start_retention(self) -> None:
        """The trainer publishes the policy line, so it sweeps it (shared/retention.py), keeping
        what it still needs; the reward models it loads are pinned for the reward learner's sweep."""
        assert self.loop is not None
        state = self.loop.state
        rms = {state.value_rm_version: "the value model's initial weights"}
        rms.update({s.target: f"guard {s.name}" for s in self.cfg.guard_specs() if s.kind == "frozen_rm"})
        pin_versions(self.store, "rm", "trainer", rms)
        self._retention = RetentionSweeper(
            self.store, "policy", RetentionRule.of(self.cfg.model_store), extra=self._policies_needed
        ).start(self.cfg.model_store.retention_interval_s)

    def _policies_needed(self) -> dict[str, str]:
        """Policy versions the trainer may load again: its KL reference and its lineage's head."""
        assert self.loop is not None
        state = self.loop.state
        return {state.reference_version: "the trainer's KL reference", state.lineage[-1]: "the trainer's lineage head"}

    def _on_completion(self, env: Envelope, record: Record) -> None:
        if isinstance(env.payload, CompletionEvent) and self.live.offer_completion(env.payload):
            LIVE_PROMPTS.inc()
            LIVE_PROMPTS_BUFFERED.set(len(self.live))
            LIVE_PROMPTS_LARGEST_SHARE.set(self.live.largest_share())

    def _build_loop(self) -> TrainingLoop:
        cfg = self.cfg
        heldout, train = self.heldout, self.train_prompts
        # round_robin: with a headless inference Service, rollouts spread over every replica.
        creds = ClientCredentials.of_service(cfg.auth)
        inference = sync_channel(cfg.inference_address, creds, options=[("grpc.lb_policy_name", "round_robin")])
        reward = sync_channel(cfg.reward_address, creds)
        self._channels += [inference, reward]
        scorer = GrpcRewardScorer(reward, cfg.rpc_timeout_s)
        collector = RolloutCollector(
            GrpcPolicySampler(inference, cfg.rpc_timeout_s), scorer, max_tokens=cfg.max_tokens, top_p=cfg.top_p
        )
        kind = POLICY_CANDIDATE if cfg.rollout else POLICY
        publisher = PolicyPublisher(
            self.store,
            KafkaAnnouncer(self._publisher, kind),
            scorer,
            heldout,
            max_tokens=cfg.heldout_max_tokens,
            signer=cfg.versions.signer("policy"),
            samples=cfg.heldout_samples,
            kind=kind,
        )
        mixer = PromptMixer(self.live, train, cfg.live_prompt_fraction, seed=cfg.seed)
        settings = LoopSettings(
            rollouts_per_iteration=cfg.rollouts_per_iteration,
            max_staleness_steps=cfg.max_staleness_steps,
            revert_after_refusals=cfg.revert_after_refusals,
            publish_every=cfg.publish_every,
            checkpoint_every=cfg.checkpoint_every,
            kl_bound=cfg.kl_bound,
            reward_tolerance=cfg.reward_tolerance,
            reward_z=cfg.reward_z,
            idle_sleep_s=cfg.idle_sleep_s,
            seed=cfg.seed,
        )
        learner, state = self._load_or_start()
        # Yield to users: the serving load read from the replica the rollouts go to (GetLoad).
        yielding = cfg.yield_settings()
        probe = GrpcLoadProbe(inference, timeout_s=min(cfg.rpc_timeout_s, 2.0)) if yielding.enabled else None
        return TrainingLoop(
            learner,
            state,
            mixer,
            collector,
            publisher,
            self.checkpoints,
            settings,
            self._load_learner,
            self.live,
            paused=cfg.start_paused,
            guards=self._build_guards(),
            governor=UserLoadGovernor(yielding, full=cfg.rollouts_per_iteration),
            user_load=probe.load if probe is not None else None,
        )

    def _build_guards(self) -> list[Guard]:
        """RLHF_TRAINER_GUARDS loaded (after the store has its models); a ConfigError naming the
        variable when a guard's reward model cannot be loaded."""
        try:
            return build_guards(self.cfg.guard_specs(), self.store, self.cfg.versions.verify_keys("rm"))
        except GuardConfigError as exc:
            raise ConfigError(f"RLHF_TRAINER_GUARDS: {exc}") from None

    def _load_learner(self, policy_version: str, state: LoopState) -> PPOLearner:
        return PPOLearner.from_store(
            self.store,
            policy_version,
            state.reference_version,
            state.value_rm_version,
            self.cfg.ppo,
            self.cfg.model_settings(),
        )

    def _load_or_start(self) -> tuple[PPOLearner, LoopState]:
        removed = self.checkpoints.remove_leftovers()
        if removed:
            log_event(log, "removed interrupted checkpoint saves", count=removed)
        loaded = self.checkpoints.load_latest(check=self._usable_here)
        if loaded is not None:
            learner, state = restore(loaded, self._load_learner)
            log_event(
                log,
                "resumed from checkpoint",
                step=state.step,
                path=str(loaded.path),
                base=state.lineage[-1],
                weights=learner.weights_version,
            )
            return learner, state
        policy, rm = self._wait_for_models()
        reference = self.cfg.reference_version or policy
        state = LoopState(lineage=[policy], reference_version=reference, value_rm_version=rm)
        learner = self._load_learner(policy, state)
        log_event(log, "starting from the current policy", policy=policy, reference=reference, rm=rm)
        return learner, state

    def _usable_here(self, loaded: LoadedCheckpoint) -> str | None:
        """A checkpoint naming a version this store lacks, or written in another policy mode or with
        another value model (learner.checkpoint_mismatch), is not resumed from (the trainer starts fresh)."""
        missing = missing_versions(loaded.state, self._has_version)
        if missing is not None:
            return missing
        meta = loaded.state.get("learner", {}).get("meta", {})
        base = str(meta.get("model_base_version", ""))  # checked against the learner's base when it loads
        return checkpoint_mismatch(meta, self.cfg.policy_mode, self.cfg.value_model, base)

    def _has_version(self, version: str) -> bool:
        try:
            self.store.path(version)
        except ModelStoreError:
            return False
        return True

    def _wait_for_models(self) -> tuple[str, str]:
        """The current policy and reward model; waits (logging) until both exist in the store."""
        while not self._stop.is_set():
            policy, rm = self.store.current("policy"), self.store.current("rm")
            if policy and rm:
                return policy, rm
            log_event(
                log,
                "waiting for a policy and a reward model in the store",
                policy=policy,
                rm=rm,
                root=str(self.store.root),
            )
            self._stop.wait(5.0)
        raise RuntimeError("stopped while waiting for models")

    def _start_thread(self, target: Callable[..., object], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    async def stop(self) -> None:
        await self.server.stop()
        self._stop.set()
        if self._retention is not None:
            await asyncio.to_thread(self._retention.stop)
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 600)
        if self.loop is not None:
            await asyncio.to_thread(self.loop.checkpoint_if_changed)
        if self._publisher is not None:
            await asyncio.to_thread(self._publisher.close)
        for channel in self._channels:
            channel.close()
        log_event(log, "trainer stopped", step=self.loop.state.step if self.loop else 0)
