"""Configuration of the PPO trainer service (environment variables RLHF_TRAINER_*; PPO's own
hyperparameters are RLHF_PPO_*, see services/trainer/ppo_config.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from services.trainer.ppo_config import PPOConfig
from shared.config import KafkaConfig, ModelStoreConfig, ServiceConfig, VersionTrustConfig

if TYPE_CHECKING:
    from services.trainer.guards import GuardSpec
    from services.trainer.models import ModelSettings
    from services.trainer.user_load import YieldSettings

DEFAULT_PROMPT_FILE = Path(__file__).parent / "data" / "prompts.jsonl"


@dataclass(frozen=True)
class TrainerConfig(ServiceConfig):
    ENV_PREFIX: ClassVar[str] = "RLHF_TRAINER_"

    kafka: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)
    """Kafka settings (RLHF_KAFKA_*): user prompts in from rlhf.completions, announcements out on
    rlhf.policy-updates."""
    model_store: ModelStoreConfig = dataclasses.field(default_factory=ModelStoreConfig)
    """Where policy and reward model versions live (RLHF_MODEL_STORE_*); the trainer publishes here."""
    versions: VersionTrustConfig = dataclasses.field(default_factory=VersionTrustConfig)
    """The key the trainer signs policy versions and their announcements with
    (RLHF_VERSIONS_POLICY_SIGNING_KEY_FILE or RLHF_VERSIONS_POLICY_SIGNING_KEY)."""
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    """PPO hyperparameters (RLHF_PPO_*)."""
    grpc_port: int = 50054
    """Port of the TrainerService gRPC server (status, pause/resume, publish now, rollback)."""
    metrics_port: int = 9104
    """Port of the Prometheus /metrics endpoint; 0 disables it."""
    inference_address: str = "127.0.0.1:50051"
    """host:port of the inference service: rollouts are sampled from the served policy there."""
    reward_address: str = "127.0.0.1:50053"
    """host:port of the reward service: rollouts and held-out answers are scored there."""
    rpc_timeout_s: float = 120.0
    """Deadline of one Generate or Score call; a failed call is retried on the next iteration."""
    prompt_file: Path = DEFAULT_PROMPT_FILE
    """JSONL prompts mixed with live user prompts, one {"messages": [...]} or {"prompt": "..."} per line.
    The first `heldout_prompts` of them are held out for the publish gate and never trained on."""
    live_prompt_fraction: float = 0.5
    """Share of each batch's prompts taken from live user prompts (rlhf.completions, source "user");
    the file fills the rest, and all of it while no live prompt has arrived. 0 = file only."""
    live_prompt_buffer: int = 1024
    """Most distinct live prompts kept (the most recently seen win)."""
    max_principal_share: float = 0.1
    """Most of the live prompt buffer one principal (CompletionEvent.principal) may hold; a principal
    over it loses its own oldest prompt. 1 turns the cap off."""
    min_principal_prompts: int = 32
    """Live prompts a principal may always hold whatever its share (a nearly empty buffer, few users)."""
    consumer_group: str = "rlhf-trainer"
    """Kafka consumer group reading rlhf.completions."""
    rollouts_per_iteration: int = 16
    """Prompts sampled per PPO iteration (one completion each); one learner step per iteration."""
    max_tokens: int = 48
    """Most tokens per sampled completion."""
    top_p: float = 1.0
    """Nucleus mass of rollout sampling. Below 1 the sampling distribution is not the policy's, so
    the behaviour log-probabilities are only approximate; keep 1 unless you accept that."""
    max_staleness_steps: int = 256
    """How many learner steps may separate the learner's weights from the weights that sampled a
    rollout (counted along the lineage: steps since the sampling version was published, or since
    the learner returned to it). Older rollouts are dropped (``rlhf_trainer_rollouts_dropped_total
    {reason="stale"}``); PPO's ratio always uses the behaviour log-probabilities recorded at
    sampling, so a kept older rollout is still corrected, but its clipped ratio carries less and
    less signal. A served version that stays the same while the trainer trains on (its candidates
    refused, or queued for the canary in rollout mode) does not keep its rollouts fresh: once all are
    older the trainer waits for a newer version to be served (a refused trainer reverts first,
    below). Default 256: in rollout mode a canary takes minutes to decide while the trainer takes
    about a step a second on the demo's model, and 64 stalled it behind a slow canary for 12
    minutes; returning to the served version instead cut its lineage and left it unable to use the
    rollouts of a version promoted afterwards (docs/benchmarks.md, "Sabotage")."""
    revert_after_refusals: int = 3
    """After this many candidates refused in a row, the learner returns to the weights of the last
    published version (fresh optimiser, same KL coefficient) instead of training further from a
    refused candidate; a refusal because the learner's held-out KL to the reference passed the bound
    reverts at once. 0: never revert (the trainer keeps training from refused candidates)."""
    rollout: bool = False
    """Progressive rollout: each version that passes the gate becomes the *candidate* (the policy
    line's candidate pointer, announced on rlhf.policy-candidates) instead of the current version,
    and the rollout service decides whether users get it (canary, then promotion or rollback).
    Off: published versions go to every user at once. Set it exactly when a rollout service runs
    (`rlhf up` and the Helm chart do); the trainer's rollback then only rebases training."""
    publish_every: int = 10
    """Evaluate the candidate and publish it if it passes the gate every this many iterations; 0 = only
    on PublishNow."""
    heldout_prompts: int = 16
    """Held-out prompts of the publish gate (taken from the start of prompt_file)."""
    heldout_max_tokens: int = 48
    """Most tokens per held-out answer (generated by the candidate itself)."""
    heldout_samples: int = 4
    """Answers the candidate samples per held-out prompt for the gate (temperature 1, one fixed seed, so
    the same weights give the same answers); the held-out reward is their mean and the KL uses them
    too. 0: one greedy answer per prompt (blind to a policy whose most likely answers did not change)."""
    guards: tuple[str, ...] = ()
    """Checks a candidate must also pass that do not move with the live reward model, comma-separated
    (services/trainer/guards.py): `frozen_rm:<rm version>:<drop allowed>` scores the held-out answers
    with that fixed RM and refuses a candidate whose mean falls more than the drop below the baseline's;
    `entry:<module>:<function>:<threshold>[:<tolerance>]` calls an operator's function(prompts, answers)
    -> float in [0, 1] and refuses below min(threshold, baseline - tolerance)."""
    kl_bound: float = 10.0
    """Publish only if the candidate's KL to the reference policy (mean per held-out answer, nats) is
    at most this: a policy drifting far from SFT is likely gaming the reward model."""
    reward_tolerance: float = 0.0
    """Publish only if the held-out reward did not fall below the last published version's by more
    than this (with the confidence of REWARD_Z)."""
    reward_z: float = 1.64
    """Confidence of the reward bound: refuse only when the upper bound mean + z * se of the
    candidate's held-out score difference to the baseline (paired by prompt) is below
    -REWARD_TOLERANCE (services/trainer/publishing.py reward_fell). 1.64: one-sided 95%. Sampled
    held-out answers make the figure noisy; with 0 (the plain comparison of the means) a candidate
    as good as the baseline is refused about half the time, and a trainer whose baseline passed on
    a lucky draw can be refused for a long time."""
    checkpoint_dir: Path | None = None
    """Where checkpoints go (policy, value model, optimiser, counters); the trainer resumes from the
    newest complete one at start. Unset: inside the model store, `<store>/.state/trainer/checkpoints`,
    so a trainer started against another store never finds this store's checkpoints. Wherever they
    are, each is stamped with the store's id (`<store>/store-id`): one of another store, or naming a
    version the store lacks, is set aside with a log line and the trainer starts fresh."""
    checkpoint_every: int = 5
    """Checkpoint every this many iterations (and after every publish and on shutdown)."""
    checkpoints_kept: int = 3
    """Complete checkpoints kept on disk."""
    start_paused: bool = False
    """Start paused (Status/Publish/Rollback work; no training until Resume)."""
    idle_sleep_s: float = 2.0
    """Pause between attempts when an iteration could not run (no prompts, a dependency down)."""
    yield_user_in_flight: int = 6
    """Yield to users: send no rollouts while this many user requests are in flight on the inference
    replica (its GetLoad), until the load falls to YIELD_RESUME_FRACTION of every threshold; fewer
    rollouts at once above that fraction (services/trainer/user_load.py). 0: not a criterion. 6: eight
    clients streaming without pause (7-8 in flight) make it yield for as long as they stay, while the
    demo's four simulated users (at most 4 in flight) leave it sampling, at two thirds of the
    concurrency at worst (8 yielded only now and then at eight clients: 3 s of 13)."""
    yield_user_waiting: int = 4
    """Yield while this many user requests have waited a while for their first token (GetLoad's
    user_waiting: queued behind other work for 0.25 s or more, not just sent). 0: not a criterion."""
    yield_user_ttft_s: float = 1.0
    """Yield while the median time to first token of the replica's recent user requests (its last
    10 s) is this many seconds or more. 0: not a criterion."""
    yield_resume_fraction: float = 0.5
    """A yield ends when the load is at most this fraction of every threshold (hysteresis); between it
    and the threshold the trainer sends fewer rollouts at once (down to one)."""
    yield_poll_s: float = 0.5
    """How often the load is read while the trainer waits, and while a group of rollouts is out (a
    group still running when the yield threshold is reached is cancelled); also before each group."""
    yield_resume_after_s: float = 2.0
    """A yield ends only once the load has stayed at or under YIELD_RESUME_FRACTION for this many
    seconds (every read meanwhile): eight clients in a closed loop dip to 3 in flight now and then
    (each request spends part of its time in the gateway and the client), which ended yields after
    ~3 s. 0: at the first low read."""
    idle_after_s: float = 30.0
    """Nobody uses the system when no user request was in flight for this many seconds."""
    idle_budget: float = 0.25
    """Share of wall time the trainer works (samples the prompt file and live prompts, trains) while
    nobody uses the system: 0 = it waits for users, 1 = full speed, 0.25 (default) = after an
    iteration of t seconds it pauses 3t (ended early when users come back). Set 1 with the three
    yield thresholds at 0 for the trainer of before (the serving load is then not read)."""
    reference_version: str = ""
    """Reference (SFT) policy of the KL penalty and the gate; empty: the policy current when the
    trainer first started (then kept in the checkpoint)."""
    torch_threads: int = 0
    """Intra-op threads of training; 0 keeps torch's default (one per core)."""
    cpu_nice: int = 10
    """Niceness added at start (ServiceConfig.cpu_nice): sampling already yields to users in the
    engine; this makes the trainer's scoring and PPO steps yield the cores to the serving processes
    on a machine that also serves (`rlhf up`). 0 where the trainer has its machine to itself."""
    policy_mode: str = "full"
    """What trains: `full` (every weight of the policy; the reference is a frozen copy, publishes
    full weights) or `lora` (LoRA adapters on the frozen base with PEFT; the reference is the base
    with the adapter switched off, no copy; publishes only the adapter, a version whose manifest
    names its base, see shared/models/adapters.py). Default full: the default model has 0.95M
    parameters, its weights are 4 MB, so LoRA saves no memory worth having and trains less of it."""
    lora_rank: int = 8
    """LoRA rank r of a new adapter (POLICY_MODE=lora); inference's max LoRA rank must be at least this."""
    lora_alpha: float = 16.0
    """LoRA alpha of a new adapter: the update is scaled by alpha / rank."""
    lora_dropout: float = 0.0
    """Dropout on a new adapter's input during training, in [0, 1)."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Comma-separated names of the linear modules that get an adapter (default: every linear layer
    of a Llama/Qwen2 block)."""
    value_model: str = "reward_model"
    """The value function: `reward_model` (a trainable copy of the reward model, InstructGPT's
    choice) or `policy_head` (a linear head on the policy's own hidden states: no copy of any
    weights, for models where a second network does not fit)."""
    device: str = "cpu"
    """torch device of the learner: `cpu`, `cuda` or `cuda:N` (one process; torchrun gives each
    process its own)."""
    precision: str = "auto"
    """Compute precision of the learner's forward passes: `bf16` (autocast), `float32`, or `auto`
    (bf16 on a GPU, float32 on the CPU). Weights and optimiser state stay float32."""
    gradient_checkpointing: bool = False
    """Recompute the policy's activations in the backward pass instead of keeping them: less memory
    for long sequences or big models, about a third more compute."""
    seed: int = 0
    """Seed of prompt mixing and rollout sampling."""

    def problems(self) -> list[str]:
        out = super().problems()
        p = self.ENV_PREFIX
        for name in ("inference_address", "reward_address"):
            if ":" not in getattr(self, name):
                out.append(f"{p}{name.upper()}={getattr(self, name)!r}: expected host:port")
        if not Path(self.prompt_file).is_file():
            out.append(f"{p}PROMPT_FILE={self.prompt_file}: no such file")
        if not 0.0 <= self.live_prompt_fraction <= 1.0:
            out.append(f"{p}LIVE_PROMPT_FRACTION must be in [0, 1]")
        if not 0.0 < self.max_principal_share <= 1.0:
            out.append(f"{p}MAX_PRINCIPAL_SHARE must be in (0, 1] (1 turns the cap off)")
        for name in (
            "live_prompt_buffer",
            "min_principal_prompts",
            "rollouts_per_iteration",
            "max_tokens",
            "heldout_max_tokens",
            "checkpoint_every",
            "checkpoints_kept",
        ):
            if getattr(self, name) < 1:
                out.append(f"{p}{name.upper()} must be at least 1")
        for name in (
            "max_staleness_steps",
            "revert_after_refusals",
            "publish_every",
            "heldout_prompts",
            "heldout_samples",
            "torch_threads",
        ):
            if getattr(self, name) < 0:
                out.append(f"{p}{name.upper()} must not be negative")
        if self.heldout_samples > 64:
            out.append(f"{p}HELDOUT_SAMPLES must be at most 64 (answers per held-out prompt)")
        out += self._guard_problems()
        out += self._model_problems()
        if not 0.0 < self.top_p <= 1.0:
            out.append(f"{p}TOP_P must be in (0, 1]")
        if self.kl_bound < 0 or self.reward_tolerance < 0 or self.reward_z < 0:
            out.append(f"{p}KL_BOUND, {p}REWARD_TOLERANCE and {p}REWARD_Z must not be negative")
        out += self._yield_problems()
        if self.rpc_timeout_s <= 0 or self.idle_sleep_s < 0:
            out.append(f"{p}RPC_TIMEOUT_S must be positive and {p}IDLE_SLEEP_S not negative")
        out += self.versions.missing(self.host, signs=("policy",))
        if self.ppo.temperature != 1.0:
            # The inference service returns log-probabilities of the raw policy (temperature 1); the
            # learner's would be of the tempered one, so PPO's ratio would be wrong from step one.
            out.append(
                "RLHF_PPO_TEMPERATURE must be 1.0: the inference service's behaviour "
                "log-probabilities are those of the untempered policy"
            )
        return out

    def checkpoint_root(self) -> Path:
        """RLHF_TRAINER_CHECKPOINT_DIR, or the trainer's directory inside the model store."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        return self.model_store.root / ".state" / "trainer" / "checkpoints"

    def model_settings(self) -> ModelSettings:
        """POLICY_MODE, LORA_*, VALUE_MODEL, DEVICE, PRECISION, GRADIENT_CHECKPOINTING for the learner."""
        from services.trainer.models import LoraSettings, ModelSettings

        return ModelSettings(
            policy_mode=self.policy_mode,
            lora=LoraSettings(
                rank=self.lora_rank,
                alpha=self.lora_alpha,
                dropout=self.lora_dropout,
                target_modules=self.lora_target_modules,
            ),
            value_model=self.value_model,
            device=self.device,
            precision=self.precision,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def _model_problems(self) -> list[str]:
        """The learner's model settings checked, each problem naming its variable."""
        from services.trainer.models import POLICY_MODES, VALUE_MODELS
        from shared.models.loading import PRECISIONS, device_problems

        p = self.ENV_PREFIX
        out = []
        if self.policy_mode not in POLICY_MODES:
            out.append(f"{p}POLICY_MODE={self.policy_mode!r}: expected one of {', '.join(POLICY_MODES)}")
        if self.value_model not in VALUE_MODELS:
            out.append(f"{p}VALUE_MODEL={self.value_model!r}: expected one of {', '.join(VALUE_MODELS)}")
        if self.precision not in PRECISIONS:
            out.append(f"{p}PRECISION={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        out += [f"{p}DEVICE: {problem}" for problem in device_problems(self.device)]
        if self.lora_rank < 1:
            out.append(f"{p}LORA_RANK must be at least 1, got {self.lora_rank}")
        if not self.lora_alpha > 0:
            out.append(f"{p}LORA_ALPHA must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            out.append(f"{p}LORA_DROPOUT must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules or not all(m.isidentifier() for m in self.lora_target_modules):
            out.append(f"{p}LORA_TARGET_MODULES must be comma-separated module names, got {self.lora_target_modules!r}")
        return out

    def _yield_problems(self) -> list[str]:
        p = self.ENV_PREFIX
        out = []
        for name in (
            "yield_user_in_flight",
            "yield_user_waiting",
            "yield_user_ttft_s",
            "yield_resume_after_s",
            "idle_after_s",
        ):
            if getattr(self, name) < 0:
                out.append(f"{p}{name.upper()} must not be negative (0 turns it off)")
        if not 0.0 <= self.yield_resume_fraction < 1.0:
            out.append(f"{p}YIELD_RESUME_FRACTION must be in [0, 1), got {self.yield_resume_fraction}")
        if self.yield_poll_s <= 0:
            out.append(f"{p}YIELD_POLL_S must be positive, got {self.yield_poll_s}")
        if not 0.0 <= self.idle_budget <= 1.0:
            out.append(f"{p}IDLE_BUDGET must be in [0, 1] (share of wall time while idle), got {self.idle_budget}")
        return out

    def yield_settings(self) -> YieldSettings:
        """The yield_* and idle_* settings for the UserLoadGovernor."""
        from services.trainer.user_load import YieldSettings

        return YieldSettings(
            user_in_flight=self.yield_user_in_flight,
            user_waiting=self.yield_user_waiting,
            user_ttft_s=self.yield_user_ttft_s,
            resume_fraction=self.yield_resume_fraction,
            poll_s=self.yield_poll_s,
            resume_after_s=self.yield_resume_after_s,
            idle_after_s=self.idle_after_s,
            idle_budget=self.idle_budget,
        )

    def guard_specs(self) -> list[GuardSpec]:
        """RLHF_TRAINER_GUARDS parsed (ValueError when malformed; problems() reports it at start)."""
        from services.trainer.guards import parse_guards

        return parse_guards(self.guards)

    def _guard_problems(self) -> list[str]:
        """Malformed guards, and entry points that cannot be imported, named with the variable."""
        from services.trainer.guards import EntryPointGuard, GuardConfigError

        name = f"{self.ENV_PREFIX}GUARDS"
        try:
            specs = self.guard_specs()
        except ValueError as exc:
            return [f"{name}: {exc}"]
        out = []
        for spec in specs:
            if spec.kind == "entry":
                try:
                    EntryPointGuard.resolve(spec.target)
                except GuardConfigError as exc:
                    out.append(f"{name}: {exc}")
        return out
