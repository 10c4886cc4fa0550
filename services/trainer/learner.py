"""PPOLearner: one PPO update of the policy (and value model) from a batch of scored rollouts.

    learner = PPOLearner(policy_dir, reference_dir, rm_dir, PPOConfig(), policy_version="policy-0001")
    stats = learner.step(rollouts)           # rollouts: list[Rollout], scored by the reward model
    learner.save_policy(out_dir)             # then publish out_dir to the model store
    learner.mark_published("policy-0002")    # rollouts sampled by policy-0002 are now on-policy

One ``step``:

1. collate the rollouts (rollout_batch.py) and, without gradients, compute per response token the
   reference (SFT) logprobs, the old logprobs and the old values;
2. rewards: ``-beta * KL_t`` at every token, the RM score at the last one (``ppo.per_token_rewards``);
3. GAE advantages and returns; advantages whitened over the batch;
4. ``epochs`` passes of shuffled minibatches: clipped surrogate + clipped value loss - entropy bonus
   (+ gamma_ptx * LM loss on pretraining text), gradient-norm clipping, one Adam step each;
5. the adaptive KL controller (if on) sees the batch's mean KL.

**Old logprobs and stale rollouts.** PPO's ratio is pi_new / pi_old where pi_old sampled the data.
The learner knows which weights it holds (``weights_version``: the published version it was loaded
from or last published, or a local label like ``policy-0003@step7`` after updates). A rollout whose
``policy_version`` equals ``weights_version`` is on-policy: its old logprobs are recomputed by the
learner (exactly the numbers the new logprobs are compared with at the first minibatch). Any other
rollout was sampled by an older policy: its ``behaviour_logprobs`` (from vLLM, required then) are
used as pi_old, so the clipped ratio corrects for the staleness (the service drops rollouts older
than its configured staleness).

**The KL penalty restrains the weights being trained.** InstructGPT's per-token penalty is the KL
of the policy being optimised to the reference; its rollouts were on-policy, so the policy that
sampled was the one trained. Here the trainer trains on while the served (behaviour) version may
lag: the penalty is ``ppo.importance_weighted_kl`` of the learner's weights at the start of the
step to the reference, at the tokens the behaviour policy chose (importance weight pi_theta/mu,
truncated at ``kl_max_weight``). On-policy rows have weight 1 exactly: the penalty is then today's
``kl_penalty`` of the same logprobs. Both KLs are reported: ``mean_kl`` (learner vs reference, what
the controller and the step log call "kl") and ``behaviour_kl`` (behaviour vs reference).

**Publishing an average.** With ``PPOConfig.average_decay`` the learner also keeps a moving average
of its trainable tensors (weight_average.py), updated after every step; ``candidate_weights()``
holds it in the policy while the caller evaluates and saves, and ``mark_published`` then labels the
learner's own weights ``version@stepN``, so the published average's rollouts count as stale.

**Data parallelism.** See distributed.py: with torch.distributed initialised every process calls
``step`` with the same rollouts and the update equals one process's on the whole batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from shared.logging import get_logger, log_event
from shared.model_store import ModelStore
from shared.models.adapters import EXTRA_KEY
from shared.models.loading import AdapterVersionError, load_tokenizer, resolve_verified, verified_dir, weights_dtype

from . import distributed
from .models import (
    ModelSettings,
    PolicyHead,
    PolicyValueHead,
    attach_lora,
    frozen_copy,
    load_adapter,
    load_policy,
    load_reference,
    load_value_model,
    lora_info,
    merge_adapter,
    save_adapter,
    save_policy,
)
from .ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    gae_advantages,
    importance_weighted_kl,
    kl_penalty,
    masked_mean,
    masked_whiten,
    rewards_with_kl,
)
from .ppo_config import PPOConfig
from .rollout_batch import InvalidRollout, Rollout, RolloutBatch, collate_rollouts, cut_at_eos
from .weight_average import WeightAverage, swapped_in

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

log = get_logger(__name__)


@dataclass
class StepStats:
    """What one ``PPOLearner.step`` did (means over the batch unless said otherwise)."""

    step: int
    """Number of this step (1 for the first)."""
    samples: int
    """Rollouts in the batch."""
    tokens: int
    """Response tokens in the batch (after cutting at EOS)."""
    seconds: float
    """Wall-clock time of the step."""
    mean_score: float
    """Mean reward model score (after clipping and the missing-EOS penalty)."""
    mean_kl: float
    """Mean over samples of the summed per-token KL(learner's weights || reference), in nats: the KL
    the penalty restrains (importance-weighted for rollouts another version sampled)."""
    behaviour_kl: float
    """The same for the policy that sampled the rollouts (KL(behaviour || reference)); equal to
    ``mean_kl`` when every rollout is on-policy."""
    mean_non_score_reward: float
    """Mean over samples of the summed -beta * KL_t."""
    entropy: float
    """Mean token entropy of the policy during the updates, in nats."""
    policy_loss: float
    value_loss: float
    ptx_loss: float
    """Mean LM loss on the pretraining text (nan when PPO-ptx is off)."""
    clipfrac: float
    """Fraction of tokens where the policy ratio was clipped."""
    value_clipfrac: float
    approx_kl: float
    """Mean k3 estimate of KL(old || new) over the updates."""
    kl_coef: float
    """Beta used for this batch's rewards."""
    next_kl_coef: float
    """Beta after the controller's update (for the next batch)."""
    policy_grad_norm: float
    """Mean gradient norm of the policy before clipping."""
    value_grad_norm: float
    mean_response_length: float
    stale_samples: int
    """Rollouts sampled by other weights than the learner's (their behaviour logprobs were used)."""
    return_mean: float
    value_mean: float
    minibatch_updates: int
    """Optimiser steps taken."""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan


@dataclass
class LearnerState:
    """Everything needed to resume training: tensors (for safetensors) and JSON-able metadata."""

    tensors: dict[str, torch.Tensor]
    """``policy.*``, ``value.*`` weights, ``policy_optim.*`` / ``value_optim.*`` Adam moments and, when
    averaging is on, ``average.*`` (the moving average of the policy's weights)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Counters, the KL coefficient, weights_version and the optimisers' param_groups."""


@dataclass
class _Prepared:
    """Per-token quantities of a whole batch, computed before the updates (all (B, R))."""

    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


class PPOLearner:
    """Holds the policy, the frozen reference, the value model and their optimisers; see the module docstring."""

    def __init__(
        self,
        policy_dir: Path,
        reference_dir: Path,
        rm_dir: Path,
        config: PPOConfig,
        *,
        policy_version: str = "policy",
        models: ModelSettings | None = None,
        adapter_dir: Path | None = None,
        weights_version: str | None = None,
    ):
        """Load from directories the caller has verified (``from_store`` verifies them itself).

        ``policy_version``: the model-store version the learner starts from (rollouts it sampled are
        on-policy). ``policy_dir`` holds full weights: the version itself, or, when it is an adapter
        version, its base (``weights_version``, default ``policy_version``) with the adapter in
        ``adapter_dir``. ``models``: full or LoRA training, the value model, device, precision
        (ModelSettings; default: full, RM value model, CPU, float32). A LoRA learner trains the
        adapter in ``adapter_dir`` or a fresh one; a full learner merges ``adapter_dir`` first.
        """
        problems = config.problems()
        models = models or ModelSettings()
        problems += models.problems()
        if problems:
            raise ValueError("invalid learner settings: " + "; ".join(problems))
        self.config = config
        self.models = models
        self.device = torch.device(models.device)
        self._autocast_dtype = models.autocast_dtype()
        self.ctx = distributed.context()
        torch.manual_seed(config.seed)  # sampling in generate(); the updates draw from their own seeded generator
        self.tokenizer = load_tokenizer(policy_dir)
        self.eos_token_id = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_id or 0))
        self.publish_dtype = weights_dtype(policy_dir)
        self.model_base_version = weights_version or policy_version
        """The full-weight version under the learner's weights: what an adapter it publishes names as
        ``base_version`` (LoRA), or the version it was loaded from (full)."""

        policy = load_policy(policy_dir)
        same = Path(reference_dir).resolve() == Path(policy_dir).resolve()
        self.peft_model: PeftModel | None = None
        """The PEFT wrapper of a LoRA policy (None: full fine-tuning)."""
        if models.lora_enabled:
            self.peft_model = (
                load_adapter(policy, adapter_dir, trainable=True)
                if adapter_dir is not None
                else attach_lora(policy, models.lora)
            )
            policy = cast("PreTrainedModel", self.peft_model.get_base_model())  # the LM, LoRA layers in it
            if same:  # the reference is the base: the same modules with the adapter off, no copy
                self.reference = PolicyHead(policy, config.temperature, adapter_off=self.peft_model.disable_adapter)
            else:
                log_event(
                    log,
                    "the KL reference is not the adapter's base: holding a separate frozen copy",
                    level=30,
                    base=self.model_base_version,
                    reference=str(reference_dir),
                )
                self.reference = PolicyHead(load_reference(reference_dir), config.temperature)
        else:
            if adapter_dir is not None:  # full fine-tuning from an adapter version: its merged weights
                policy = merge_adapter(policy, adapter_dir)
                same = False
            reference = frozen_copy(policy) if same else load_reference(reference_dir)
            self.reference = PolicyHead(reference, config.temperature)
        if models.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy = PolicyHead(policy, config.temperature)
        if models.value_model == "policy_head":
            self.value: nn.Module = PolicyValueHead(policy, int(policy.config.hidden_size))
        else:
            self.value = load_value_model(rm_dir)
        for module in (self.policy, self.reference, self.value):
            module.to(self.device)
        self._policy_ddp = distributed.wrap_for_ddp(self.policy, self.ctx)
        self._value_ddp = distributed.wrap_for_ddp(self.value, self.ctx)
        self.policy_optimizer = _adam(_trainable(self.policy), config.lr, config.adam_eps)
        self.value_optimizer = _adam(_trainable(self.value), config.effective_value_lr, config.adam_eps)
        if config.adaptive_kl:
            self.kl_controller: AdaptiveKLController | FixedKLController = AdaptiveKLController(
                config.kl_coef, config.target_kl, config.kl_horizon
            )
        else:
            self.kl_controller = FixedKLController(config.kl_coef)
        self.base_version = policy_version
        self.weights_version = policy_version
        """The version label of the weights the learner holds (see the module docstring)."""
        self.steps_done = 0
        self.samples_seen = 0
        self.published_at_step = 0
        """``steps_done`` when the learner's candidate was last published (or loaded from a version)."""
        self.average: WeightAverage | None = (
            WeightAverage(self._policy_tensors(), config.average_decay) if config.average_decay > 0 else None
        )
        """The moving average of the policy's weights that is evaluated and published (None: off)."""
        self._ptx_tokens: torch.Tensor | None = None

    @classmethod
    def from_store(
        cls,
        store: ModelStore,
        policy_version: str,
        reference_version: str,
        rm_version: str,
        config: PPOConfig,
        models: ModelSettings | None = None,
    ) -> PPOLearner:
        """Verify the versions' sha256 manifests, then load them. An adapter version (policy or
        reference) is checked against the adapter contract and loaded on its verified base
        (shared/models/loading.py ``resolve_verified``)."""
        policy = resolve_verified(store, policy_version)
        reference = resolve_verified(store, reference_version)
        if reference.adapter_dir is not None:
            raise AdapterVersionError(
                f"the KL reference {reference_version} is an adapter version: the reference must be full weights"
            )
        return cls(
            policy.weights_dir,
            reference.weights_dir,
            verified_dir(store, rm_version),
            config,
            policy_version=policy_version,
            models=models,
            adapter_dir=policy.adapter_dir,
            weights_version=policy.weights_version,
        )

    @property
    def trainable_parameters(self) -> int:
        """Parameters the policy optimiser updates (the adapter's alone with LoRA)."""
        return sum(p.numel() for p in _trainable(self.policy))

    def _autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast of the forward passes when the settings ask for it (``ModelSettings.precision``)."""
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    # --- the update ----------------------------------------------------------------------------

    def step(self, rollouts: Sequence[Rollout]) -> StepStats:
        """One PPO update from ``rollouts`` (every data-parallel process passes the same list)."""
        started = time.monotonic()
        cfg = self.config
        batch, prepared, facts = self._prepare(rollouts)
        mask = batch.response_mask

        sums: dict[str, float] = {}
        updates = 0
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.steps_done)
        for _ in range(cfg.epochs):
            order = torch.randperm(batch.size, generator=generator)
            for start in range(0, batch.size, cfg.minibatch_size):
                minibatch = order[start : start + cfg.minibatch_size]
                for key, value in self._update(batch, prepared, minibatch, generator).items():
                    sums[key] = sums.get(key, 0.0) + value
                updates += 1
        means = {k: v / updates for k, v in sums.items()}
        means = self._mean_over_processes(means)

        kl, kl_coef, scores, stale = facts["kl"], facts["kl_coef"], facts["scores"], facts["stale"]
        mean_kl = float(kl.sum(-1).mean())
        behaviour_kl = float(facts["behaviour_kl"].sum(-1).mean())
        self.kl_controller.update(mean_kl, batch.size)
        if self.average is not None:
            self.average.update(self._policy_tensors())
        self.steps_done += 1
        self.samples_seen += batch.size
        self.weights_version = f"{self.base_version}@step{self.steps_done}"
        stats = StepStats(
            step=self.steps_done,
            samples=batch.size,
            tokens=int(mask.sum()),
            seconds=time.monotonic() - started,
            mean_score=float(scores.mean()),
            mean_kl=mean_kl,
            behaviour_kl=behaviour_kl,
            mean_non_score_reward=float(facts["non_score"].mean()),
            entropy=means["entropy"],
            policy_loss=means["policy_loss"],
            value_loss=means["value_loss"],
            ptx_loss=means.get("ptx_loss", math.nan),
            clipfrac=means["clipfrac"],
            value_clipfrac=means["value_clipfrac"],
            approx_kl=means["approx_kl"],
            kl_coef=kl_coef,
            next_kl_coef=self.kl_controller.value,
            policy_grad_norm=means["policy_grad_norm"],
            value_grad_norm=means["value_grad_norm"],
            mean_response_length=float(mask.sum(-1).mean()),
            stale_samples=int(stale.sum()),
            return_mean=float(masked_mean(prepared.returns, mask)),
            value_mean=float(masked_mean(prepared.old_values, mask)),
            minibatch_updates=updates,
        )
        log_event(
            log,
            "ppo step",
            step=stats.step,
            samples=stats.samples,
            tokens=stats.tokens,
            score=round(stats.mean_score, 4),
            kl=round(stats.mean_kl, 4),
            behaviour_kl=round(stats.behaviour_kl, 4),
            kl_coef=round(kl_coef, 5),
            clipfrac=round(stats.clipfrac, 3),
            seconds=round(stats.seconds, 2),
            samples_per_s=round(stats.samples_per_s, 2),
        )
        return stats

    def _prepare(self, rollouts: Sequence[Rollout]) -> tuple[RolloutBatch, _Prepared, dict[str, Any]]:
        """Collate, then (no gradients) old logprobs, reference logprobs, values, rewards, GAE, whitening."""
        cfg = self.config
        batch = _to_device(collate_rollouts(rollouts, self.pad_token_id, self.eos_token_id), self.device)
        stale = self._stale_rows(rollouts, batch)
        mask = batch.response_mask
        scores = self._scores(batch)
        old_logprobs, learner_logprobs, ref_logprobs, old_values = self._no_grad_pass(batch, stale)
        kl_coef = self.kl_controller.value
        kl = importance_weighted_kl(learner_logprobs, old_logprobs, ref_logprobs, cfg.kl_estimator, cfg.kl_max_weight)
        rewards, kl = rewards_with_kl(scores, kl, mask, kl_coef)
        behaviour_kl = kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
        if cfg.whiten_rewards and mask.sum() > 1:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae_advantages(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages and mask.sum() > 1:
            advantages = masked_whiten(advantages, mask) * mask
        facts = {
            "scores": scores,
            "kl": kl,
            "behaviour_kl": behaviour_kl,
            "kl_coef": kl_coef,
            "stale": stale,
            "non_score": (-kl_coef * kl).sum(-1),
        }
        return batch, _Prepared(old_logprobs, old_values, advantages, returns), facts

    def _scores(self, batch: RolloutBatch) -> torch.Tensor:
        scores = batch.scores.clone()
        if self.config.missing_eos_penalty:
            scores = scores - self.config.missing_eos_penalty * (~batch.ended_with_eos).float()
        if self.config.score_clip is not None:
            scores = scores.clamp(-self.config.score_clip, self.config.score_clip)
        return scores

    def _stale_rows(self, rollouts: Sequence[Rollout], batch: RolloutBatch) -> torch.Tensor:
        stale = torch.tensor([r.policy_version != self.weights_version for r in rollouts], device=self.device)
        missing = (stale & ~batch.has_behaviour_logprobs).nonzero().flatten().tolist()
        if missing:
            i = missing[0]
            raise InvalidRollout(
                f"rollout {i}: sampled by {rollouts[i].policy_version}, the learner holds {self.weights_version}: "
                "behaviour_logprobs are needed for an off-policy rollout",
                param="behaviour_logprobs",
            )
        return stale

    @torch.no_grad()
    def _no_grad_pass(
        self, batch: RolloutBatch, stale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(old logprobs, learner logprobs, reference logprobs, old values), each (B, R); rows sharded
        across processes.

        Old logprobs: the behaviour logprobs for stale rollouts (and for every rollout that has them
        when ``recompute_logprobs`` is off), else the learner's own. Learner logprobs: the learner's
        own for stale rollouts (the KL penalty's weights, see the module docstring), the old ones
        for on-policy rows (whose importance weight is then exactly 1).
        """
        use_behaviour = stale | (batch.has_behaviour_logprobs & (not self.config.recompute_logprobs))
        need_current = not bool(use_behaviour.all()) or bool(stale.any())
        rows = distributed.shard_rows(batch.size, self.ctx)
        parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref": [], "values": []}
        step = self.config.forward_batch_size
        width = batch.response_mask.shape[1]
        for start in range(0, len(rows), step):
            sub, _ = _trimmed(batch, rows[start : start + step])
            args = (sub.input_ids, sub.attention_mask, sub.response_positions)
            with self._autocast():
                if need_current:
                    parts["logprobs"].append(_pad_cols(self.policy(*args, sub.response_ids)[0], width))
                parts["ref"].append(_pad_cols(self.reference(*args, sub.response_ids)[0], width))
                parts["values"].append(_pad_cols(self.value(*args).float(), width))
        out = {}
        for key, chunks in parts.items():
            if key == "logprobs" and not need_current:
                out[key] = batch.behaviour_logprobs
                continue
            local = torch.cat(chunks) if chunks else torch.zeros((0, width), device=self.device)
            out[key] = distributed.all_gather_rows(local, batch.size, self.ctx) * batch.response_mask
        old = torch.where(use_behaviour.unsqueeze(1), batch.behaviour_logprobs, out["logprobs"]) * batch.response_mask
        learner = torch.where(stale.unsqueeze(1), out["logprobs"], old) * batch.response_mask
        return old, learner, out["ref"], out["values"]

    def _update(
        self, batch: RolloutBatch, prepared: _Prepared, minibatch: torch.Tensor, generator: torch.Generator
    ) -> dict[str, float]:
        """One optimiser step on ``minibatch`` (global row indices); returns this process's diagnostics."""
        cfg = self.config
        ptx_ids = self._ptx_batch(generator).to(self.device) if cfg.ptx_coef > 0 else None
        loss, stats = self._minibatch_loss(batch, prepared, minibatch, ptx_ids, cfg.ptx_coef)
        self.policy_optimizer.zero_grad(set_to_none=True)
        self.value_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats["policy_grad_norm"] = _clip(_trainable(self.policy), cfg.max_grad_norm)
        stats["value_grad_norm"] = _clip(_trainable(self.value), cfg.max_grad_norm)
        self.policy_optimizer.step()
        self.value_optimizer.step()
        return stats

    def _minibatch_loss(
        self,
        batch: RolloutBatch,
        prepared: _Prepared,
        minibatch: torch.Tensor,
        ptx_ids: torch.Tensor | None,
        ptx_coef: float,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This process's share of the total loss of ``minibatch``:

            policy_loss + vf_coef * value_loss - ent_coef * entropy  (+ ptx_coef * LM loss on ``ptx_ids``)

        each term a token mean over the whole minibatch once data-parallel gradients are averaged.
        """
        cfg, ctx = self.config, self.ctx
        rows = minibatch[ctx.rank :: ctx.world_size]
        weight = 1.0
        if len(rows) == 0:  # fewer rows than processes: compute a row with zero weight (DDP needs a backward)
            rows, weight = minibatch[:1], 0.0
        sub, width = _trimmed(batch, rows.tolist())
        mask = sub.response_mask
        # Sum over this process's tokens / tokens of the whole minibatch, times world (see distributed.py).
        scale = weight * float(mask.sum()) * ctx.world_size / float(batch.response_mask[minibatch].sum())

        ptx_local, ptx_scale = None, 0.0
        if ptx_ids is not None:
            ptx_local = ptx_ids[ctx.rank :: ctx.world_size]
            ptx_scale = ctx.world_size * len(ptx_local) / len(ptx_ids)
            if len(ptx_local) == 0:
                ptx_local, ptx_scale = ptx_ids[:1], 0.0

        with self._autocast():
            logprobs, entropy, ptx_nll = self._policy_ddp(
                sub.input_ids,
                sub.attention_mask,
                sub.response_positions,
                sub.response_ids,
                ptx_local,
                None if ptx_local is None else torch.ones_like(ptx_local),
                cfg.ent_coef > 0,
            )
            values = self._value_ddp(sub.input_ids, sub.attention_mask, sub.response_positions).float()
        policy_loss, clipfrac, approx_kl = clipped_policy_loss(
            logprobs, prepared.old_logprobs[rows, :width], prepared.advantages[rows, :width], mask, cfg.clip_range
        )
        value_loss, value_clipfrac = clipped_value_loss(
            values, prepared.old_values[rows, :width], prepared.returns[rows, :width], mask, cfg.clip_range_value
        )
        entropy_mean = masked_mean(entropy, mask)
        loss = scale * (policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy_mean)
        stats = {
            "policy_loss": float(policy_loss.detach()),
            "value_loss": float(value_loss.detach()),
            "entropy": float(entropy_mean.detach()),
            "clipfrac": float(clipfrac),
            "value_clipfrac": float(value_clipfrac),
            "approx_kl": float(approx_kl),
        }
        if ptx_nll is not None:
            ptx_loss = ptx_nll.mean()
            loss = loss + ptx_coef * ptx_scale * ptx_loss
            stats["ptx_loss"] = float(ptx_loss.detach())
        return loss, stats

    # --- PPO-ptx data ------------------------------------------------------------------------

    def _ptx_batch(self, generator: torch.Generator) -> torch.Tensor:
        """(ptx_batch_size, ptx_seq_len) windows of the tokenized pretraining file, drawn with ``generator``."""
        if self._ptx_tokens is None:
            text = Path(self.config.ptx_file).read_text(encoding="utf-8")
            backend = getattr(self.tokenizer, "backend_tokenizer", None)  # fast path, no length warning
            ids = (
                backend.encode(text, add_special_tokens=False).ids
                if backend is not None
                else self.tokenizer.encode(text, add_special_tokens=False, verbose=False)
            )
            if len(ids) <= self.config.ptx_seq_len:
                raise ValueError(
                    f"{self.config.ptx_file}: {len(ids)} tokens, fewer than ptx_seq_len {self.config.ptx_seq_len}"
                )
            self._ptx_tokens = torch.tensor(ids, dtype=torch.long)
        n, length = len(self._ptx_tokens), self.config.ptx_seq_len
        starts = torch.randint(0, n - length + 1, (self.config.ptx_batch_size,), generator=generator)
        return torch.stack([self._ptx_tokens[s : s + length] for s in starts.tolist()])

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        if not self.ctx.enabled:
            return values
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return {k: float(v) / self.ctx.world_size for k, v in zip(keys, tensor)}

    # --- evaluation helpers -------------------------------------------------------------------

    @torch.no_grad()
    def kl_to_reference(self, rollouts: Sequence[Rollout]) -> float:
        """Mean over rollouts of sum_t KL(pi(.|prefix_t) || pi_ref(.|prefix_t)): the exact KL over the whole
        vocabulary at every response token of the given responses (never negative, unlike a sampled
        estimate on responses the current policy did not sample). For the publish gate."""
        batch = _to_device(collate_rollouts(rollouts, self.pad_token_id, self.eos_token_id), self.device)
        rows = distributed.shard_rows(batch.size, self.ctx)
        sums = []
        for start in range(0, len(rows), self.config.forward_batch_size):
            sub, _ = _trimmed(batch, rows[start : start + self.config.forward_batch_size])
            args = (sub.input_ids, sub.attention_mask, sub.response_positions)
            with self._autocast():
                logp = torch.log_softmax(self.policy.response_logits(*args).float(), -1)
                ref_logp = torch.log_softmax(self.reference.response_logits(*args).float(), -1)
            per_token = (logp.exp() * (logp - ref_logp)).sum(-1)
            sums.append((per_token * sub.response_mask).sum(-1, keepdim=True))
        local = torch.cat(sums) if sums else torch.zeros((0, 1), device=self.device)
        return float(distributed.all_gather_rows(local, batch.size, self.ctx).mean())

    @torch.no_grad()
    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        greedy: bool = True,
        temperature: float = 1.0,
        seed: int | None = None,
        return_logprobs: bool = False,
    ) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
        """Responses of the current policy (transformers ``generate``, no top-k/top-p, cut after EOS), one
        per prompt; with ``return_logprobs`` also each sampled token's logprob under the sampling
        distribution (logits / temperature), usable as Rollout.behaviour_logprobs."""
        # Any: transformers types generate() for its own checker (self: a Protocol mypy does not
        # match to a PreTrainedModel) and returns a union that return_dict_in_generate=True narrows.
        lm: Any = self.policy.lm
        if seed is not None:
            torch.manual_seed(seed)
        width = max(len(p) for p in prompt_token_ids)
        ids = torch.full((len(prompt_token_ids), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, prompt in enumerate(prompt_token_ids):  # left padding: generation continues every row
            ids[i, width - len(prompt) :] = torch.tensor(list(prompt))
            attention[i, width - len(prompt) :] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        was_training = lm.training
        lm.eval()
        try:
            with self._autocast():
                out = lm.generate(
                    input_ids=ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    do_sample=not greedy,
                    temperature=temperature if not greedy else None,
                    top_k=0 if not greedy else None,
                    top_p=1.0 if not greedy else None,
                    pad_token_id=self.pad_token_id,
                    eos_token_id=self.eos_token_id,
                    use_cache=True,
                    return_dict_in_generate=True,
                    output_scores=return_logprobs,
                )
        finally:
            lm.train(was_training)
        generated = out.sequences[:, width:]
        responses = [cut_at_eos(row.tolist(), self.eos_token_id) for row in generated]
        if not return_logprobs:
            return responses
        scores = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)  # processed scores: logits / T
        token_logprobs = torch.gather(scores, -1, generated[:, : scores.shape[1]].unsqueeze(-1)).squeeze(-1)
        return responses, [token_logprobs[i, : len(r)].tolist() for i, r in enumerate(responses)]

    # --- publishing and checkpoints -----------------------------------------------------------

    @contextmanager
    def candidate_weights(self) -> Iterator[None]:
        """Within the block the policy holds what the learner would publish: its moving average
        (``PPOConfig.average_decay``) when that is on, else its own weights (nothing changes).
        Evaluate, run guards and ``save_policy`` inside; training resumes from its own weights."""
        if self.average is None:
            yield
            return
        with swapped_in(self._policy_tensors(), self.average.tensors):
            yield

    @property
    def updated_since_publish(self) -> bool:
        """Whether a step was taken since the candidate was last published (or the weights loaded)."""
        return self.steps_done != self.published_at_step

    def mark_published(self, version: str) -> None:
        """The candidate was published as ``version``. Without averaging that is the current weights,
        so rollouts ``version`` samples are on-policy; with it the published weights are the average
        and the learner's own are labelled ``version@stepN`` (its rollouts are off-policy for them)."""
        self.base_version = version
        self.weights_version = version if self.average is None else f"{version}@step{self.steps_done}"
        self.published_at_step = self.steps_done

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The policy's weights (transformers names), detached copies."""
        return {k: v.detach().clone() for k, v in self.policy.lm.state_dict().items()}

    def save_policy(self, out_dir: Path, digest: str = "blake3") -> dict[str, tuple[str, int]]:
        """Write the policy as a directory the inference service can load: full weights (a Hugging
        Face directory it hot-swaps, models.save_policy), or with LoRA only the adapter's files
        (models.save_adapter; publish them with ``version_extra()`` in the manifest). Returns the
        files hashed under ``digest`` as they were written (``ModelStore.publish(hashed=)``): the
        full weights' file; none for an adapter (MBs, hashed by the store)."""
        if self.peft_model is not None:
            save_adapter(self.peft_model, out_dir, self.model_base_version)
            return {}
        return save_policy(self.policy.lm, self.tokenizer, out_dir, dtype=self.publish_dtype, digest=digest)

    def version_extra(self) -> dict[str, Any]:
        """What a version written by ``save_policy`` adds to its manifest's ``extra``: the adapter
        description (shared/models/adapters.py) with LoRA, nothing for full weights."""
        if self.peft_model is None:
            return {}
        return {EXTRA_KEY: lora_info(self.peft_model, self.model_base_version).to_extra()}

    def _policy_tensors(self) -> dict[str, torch.Tensor]:
        """The policy tensors a checkpoint holds: every weight (full), or the adapter's alone (LoRA:
        the base is the store version ``model_base_version``)."""
        if self.peft_model is None:
            return dict(self.policy.lm.state_dict())
        return {name: p for name, p in self.policy.lm.named_parameters() if p.requires_grad}

    def state_dict(self) -> LearnerState:
        """Policy (the adapter alone with LoRA), value model, both optimisers and the counters, as
        tensors + JSON (no pickle)."""
        tensors: dict[str, torch.Tensor] = {}
        for prefix, named in (("policy", self._policy_tensors()), ("value", self.value.state_dict())):
            for name, tensor in named.items():
                tensors[f"{prefix}.{name}"] = tensor.detach().cpu().contiguous().clone()
        meta: dict[str, Any] = {
            "format": 1,
            "steps_done": self.steps_done,
            "samples_seen": self.samples_seen,
            "kl_coef": self.kl_controller.value,
            "weights_version": self.weights_version,
            "base_version": self.base_version,
            "policy_mode": self.models.policy_mode,
            "value_model": self.models.value_model,
            "model_base_version": self.model_base_version,
            "published_at_step": self.published_at_step,
        }
        if self.average is not None:
            for name, tensor in self.average.tensors.items():
                tensors[f"average.{name}"] = tensor.detach().cpu().contiguous().clone()
            meta["average_updates"] = self.average.updates
        for prefix, optimizer in (("policy_optim", self.policy_optimizer), ("value_optim", self.value_optimizer)):
            state = optimizer.state_dict()
            for index, slots in state["state"].items():
                for slot, value in slots.items():
                    tensors[f"{prefix}.{index}.{slot}"] = torch.as_tensor(value).detach().cpu().contiguous().clone()
            meta[f"{prefix}.param_groups"] = _jsonable(state["param_groups"])
        return LearnerState(tensors, meta)

    def load_state_dict(self, state: LearnerState) -> None:
        """Restore what ``state_dict`` returned (the same model architecture and PPOConfig optimiser layout)."""
        if state.meta.get("format") != 1:
            raise ValueError(f"unsupported learner state format {state.meta.get('format')!r}")
        problem = checkpoint_mismatch(
            state.meta, self.models.policy_mode, self.models.value_model, self.model_base_version
        )
        if problem:
            raise ValueError(problem)
        policy = {k[len("policy.") :]: v for k, v in state.tensors.items() if k.startswith("policy.")}
        if self.peft_model is None:
            self.policy.lm.load_state_dict(policy, strict=True)
        else:
            expected = self._policy_tensors().keys()
            if policy.keys() != expected:
                odd = sorted(policy.keys() ^ expected)
                raise ValueError(
                    f"the checkpoint's adapter does not match this LoRA policy: {len(odd)} tensors differ, e.g. {odd[0]}"
                )
            self.policy.lm.load_state_dict(policy, strict=False)
        self.value.load_state_dict(
            {k[len("value.") :]: v for k, v in state.tensors.items() if k.startswith("value.")}, strict=True
        )
        for prefix, optimizer in (("policy_optim", self.policy_optimizer), ("value_optim", self.value_optimizer)):
            slots: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in state.tensors.items():
                if key.startswith(prefix + "."):
                    index, slot = key[len(prefix) + 1 :].split(".", 1)
                    slots.setdefault(int(index), {})[slot] = value.clone()
            groups = state.meta[f"{prefix}.param_groups"]
            for group in groups:
                if "betas" in group:
                    group["betas"] = tuple(group["betas"])
            optimizer.load_state_dict({"state": slots, "param_groups": groups})
        self.steps_done = int(state.meta["steps_done"])
        self.samples_seen = int(state.meta["samples_seen"])
        self.kl_controller.value = float(state.meta["kl_coef"])
        self.weights_version = str(state.meta["weights_version"])
        self.base_version = str(state.meta["base_version"])
        # A checkpoint from before this field: published at this step exactly when its label says so.
        published = state.meta.get("published_at_step")
        self.published_at_step = (
            int(published)
            if published is not None
            else (self.steps_done if self.weights_version == self.base_version else -1)
        )
        if self.average is not None:
            average = {k[len("average.") :]: v for k, v in state.tensors.items() if k.startswith("average.")}
            if average:
                self.average.load(average, int(state.meta.get("average_updates", 0)))
            else:  # written with averaging off: the average starts at the restored weights
                self.average = WeightAverage(self._policy_tensors(), self.config.average_decay)


# --- helpers ------------------------------------------------------------------------------------


def checkpoint_mismatch(meta: dict[str, Any], policy_mode: str, value_model: str, base_version: str) -> str | None:
    """Why a checkpoint's learner state (``meta``) cannot resume a learner with these settings, or
    None. A checkpoint written before these fields existed is full fine-tuning with the RM value
    model. The adapter of a LoRA checkpoint applies to its own base version only."""
    was_mode = meta.get("policy_mode", "full")
    if was_mode != policy_mode:
        return (
            f"the checkpoint trained the policy with RLHF_TRAINER_POLICY_MODE={was_mode}, this trainer "
            f"runs {policy_mode}: set it back, or move the checkpoints away to start fresh"
        )
    was_value = meta.get("value_model", "reward_model")
    if was_value != value_model:
        return (
            f"the checkpoint's value model is RLHF_TRAINER_VALUE_MODEL={was_value}, this trainer runs "
            f"{value_model}: set it back, or move the checkpoints away to start fresh"
        )
    was_base = meta.get("model_base_version")
    if policy_mode == "lora" and was_base is not None and was_base != base_version:
        return f"the checkpoint's adapter was trained on {was_base}, this learner's base is {base_version}"
    return None


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` an optimiser updates (requires_grad)."""
    return [p for p in module.parameters() if p.requires_grad]


def _to_device(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    """``batch`` with every tensor on ``device`` (the same object when it is there already)."""
    if batch.input_ids.device == device:
        return batch
    return RolloutBatch(**{f.name: getattr(batch, f.name).to(device) for f in fields(batch)})


def _trimmed(batch: RolloutBatch, rows: Sequence[int]) -> tuple[RolloutBatch, int]:
    """The sub-batch of ``rows`` without the padding columns none of them needs; and its response width."""
    sub = batch.select(list(rows))
    seq = int(sub.attention_mask.sum(-1).max())
    width = int(sub.response_mask.sum(-1).max())
    return RolloutBatch(
        input_ids=sub.input_ids[:, :seq],
        attention_mask=sub.attention_mask[:, :seq],
        response_ids=sub.response_ids[:, :width],
        response_positions=sub.response_positions[:, :width],
        response_mask=sub.response_mask[:, :width],
        scores=sub.scores,
        behaviour_logprobs=sub.behaviour_logprobs[:, :width],
        has_behaviour_logprobs=sub.has_behaviour_logprobs,
        ended_with_eos=sub.ended_with_eos,
    ), width


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad (rows, w) with zeros to (rows, width)."""
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


def _adam(parameters: Any, lr: float, eps: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass over all parameters; several times faster than the per-tensor
    loop on small models), the multi-tensor one where fused is unavailable."""
    params = list(parameters)
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, eps=eps, foreach=True)


def _clip(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value
