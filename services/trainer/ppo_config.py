"""Every PPO hyperparameter in one documented config (environment variables RLHF_PPO_*).

The trainer service nests it as a field of its own config; ``rlhf config`` lists the variables.
Defaults are InstructGPT's / TRL's where they apply, scaled to the tiny default model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import shared
from shared.config import ConfigBase

# Light on purpose (no torch, no transformers): `rlhf config` and the service's config import this.
DEFAULT_PTX_FILE = Path(shared.__file__).parent / "data" / "corpus.txt"
"""The pretraining corpus the project ships (shared/data/corpus.txt, also the default model's tokenizer corpus)."""
KL_ESTIMATORS = ("k1", "k3")


@dataclass(frozen=True)
class PPOConfig(ConfigBase):
    ENV_PREFIX: ClassVar[str] = "RLHF_PPO_"

    lr: float = 1e-5
    """Adam learning rate of the policy."""
    value_lr: float | None = None
    """Adam learning rate of the value model; unset uses `lr`."""
    adam_eps: float = 1e-5
    """Adam epsilon (cleanrl and InstructGPT use 1e-5)."""
    epochs: int = 4
    """PPO epochs: passes over each batch of rollouts."""
    minibatch_size: int = 8
    """Samples per optimiser step; the batch of rollouts given to one `step` is split into minibatches of this
    size (the last one may be smaller). With N data-parallel processes each computes minibatch_size / N."""
    clip_range: float = 0.2
    """PPO's epsilon: the policy ratio is clipped to [1 - clip_range, 1 + clip_range]."""
    clip_range_value: float = 0.2
    """Clip of the value update around the old values, in reward units."""
    gamma: float = 1.0
    """Discount of GAE (1: undiscounted, as TRL and InstructGPT)."""
    lam: float = 0.95
    """Lambda of GAE."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (0: off); the loss subtracts ent_coef * mean token entropy."""
    max_grad_norm: float = 1.0
    """Gradient norm clip, applied to the policy's and to the value model's gradients separately; 0 disables."""
    kl_coef: float = 0.05
    """Beta: weight of the per-token KL penalty to the reference (SFT) policy; the initial value when adaptive."""
    adaptive_kl: bool = False
    """Adapt kl_coef so the per-sample KL tracks target_kl (Ziegler et al. 2019); else it stays fixed."""
    target_kl: float = 6.0
    """Target of the adaptive controller: KL per sample (summed over response tokens), in nats."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in samples."""
    kl_estimator: str = "k1"
    """Per-token KL estimate in the reward: k1 = log pi - log pi_ref (InstructGPT), or k3 (never negative)."""
    kl_max_weight: float = 5.0
    """Truncation of the importance weight pi_theta / mu of the KL penalty for rollouts another
    version sampled (see ppo.importance_weighted_kl): bounded variance for a small bias; on-policy
    rows have weight 1 whatever it is."""
    whiten_advantages: bool = True
    """Whiten advantages over the whole batch (zero mean, unit variance) before the updates."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards over the batch (scale only, the mean is kept) before GAE."""
    score_clip: float | None = None
    """Clip reward model scores to [-score_clip, score_clip] before use; unset keeps them as they are."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response that did not end with EOS (cut at max tokens); 0 = off."""
    temperature: float = 1.0
    """Sampling temperature the rollouts were generated with: the learner divides logits by it, so its
    logprobs are those of the distribution that sampled."""
    ptx_coef: float = 0.0
    """gamma_ptx of PPO-ptx: weight of a language-modelling loss on ptx_file mixed into every update; 0 = off.
    Small: Adam scales each parameter's step by its own gradient, so even a small weight moves the
    parameters PPO barely touches at full speed. On the default model 0.002 kept the pretraining
    perplexity under the SFT policy's without losing the task; 0.02 and 0.1 pulled it back to the
    pretrained model and lost 8 points of win rate (docs/benchmarks.md, "PPO against PPO-ptx")."""
    ptx_file: Path = DEFAULT_PTX_FILE
    """Pretraining text for PPO-ptx (plain UTF-8); default: the corpus the project ships."""
    ptx_batch_size: int = 4
    """Pretraining sequences per optimiser step (split across data-parallel processes)."""
    ptx_seq_len: int = 64
    """Tokens per pretraining sequence."""
    recompute_logprobs: bool = False
    """True: recompute the old logprobs of on-policy rollouts with the learner's weights (the first ratio
    is exactly 1). False (default): use the sampler's ``behaviour_logprobs`` when a rollout has them, as
    TRL's PPO does with generate's scores, saving one forward pass per batch: more samples/s at the same
    reward gain in tests/benchmarks/bench_trainer.py (see docs/benchmarks.md). vLLM's logprobs equal
    transformers' within 1e-3 (tests/integration/test_chat_api.py), far inside the clip range. Stale
    rollouts always use them."""
    average_decay: float = 0.0
    """Publish an exponential moving average of the policy's weights instead of the weights themselves
    (services/trainer/weight_average.py): beta of avg <- beta * avg + (1 - beta) * theta after each step,
    warmed up as min(beta, (1 + t) / (10 + t)); 0 = off (publish the weights trained). Costs one float32
    copy of the trainable tensors (the adapter's alone with LoRA). The demo uses 0.98: the served policy is steadier and
    much closer to the reference for the same learning (docs/benchmarks.md, "Publishing an average of
    the weights")."""
    forward_batch_size: int = 16
    """Most samples per no-grad forward pass when computing reference logprobs and values (memory bound only)."""
    seed: int = 0
    """Seed of minibatch shuffling and pretraining sampling: same seed and data, same update."""

    @property
    def effective_value_lr(self) -> float:
        return self.lr if self.value_lr is None else self.value_lr

    def problems(self) -> list[str]:
        p = self.ENV_PREFIX
        out = []
        if not self.lr > 0:
            out.append(f"{p}LR must be positive")
        if self.value_lr is not None and not self.value_lr > 0:
            out.append(f"{p}VALUE_LR must be positive")
        if not self.adam_eps > 0:
            out.append(f"{p}ADAM_EPS must be positive")
        if self.epochs < 1:
            out.append(f"{p}EPOCHS must be at least 1")
        if self.minibatch_size < 1:
            out.append(f"{p}MINIBATCH_SIZE must be at least 1")
        if not 0 < self.clip_range < 1:
            out.append(f"{p}CLIP_RANGE must be in (0, 1)")
        if not self.clip_range_value > 0:
            out.append(f"{p}CLIP_RANGE_VALUE must be positive")
        if not 0 <= self.gamma <= 1:
            out.append(f"{p}GAMMA must be in [0, 1]")
        if not 0 <= self.lam <= 1:
            out.append(f"{p}LAM must be in [0, 1]")
        if self.vf_coef < 0 or self.ent_coef < 0 or self.ptx_coef < 0:
            out.append(f"{p}VF_COEF, {p}ENT_COEF and {p}PTX_COEF must not be negative")
        if self.max_grad_norm < 0:
            out.append(f"{p}MAX_GRAD_NORM must not be negative (0 disables clipping)")
        if self.kl_coef < 0:
            out.append(f"{p}KL_COEF must not be negative")
        if self.adaptive_kl and (not self.target_kl > 0 or self.kl_horizon < 1 or not self.kl_coef > 0):
            out.append(f"{p}ADAPTIVE_KL needs {p}TARGET_KL > 0, {p}KL_HORIZON >= 1 and {p}KL_COEF > 0")
        if self.kl_max_weight < 1:
            out.append(f"{p}KL_MAX_WEIGHT must be at least 1 (on-policy rows have weight 1)")
        if self.kl_estimator not in KL_ESTIMATORS:
            out.append(f"{p}KL_ESTIMATOR={self.kl_estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")
        if self.score_clip is not None and not self.score_clip > 0:
            out.append(f"{p}SCORE_CLIP must be positive when set")
        if self.missing_eos_penalty < 0:
            out.append(f"{p}MISSING_EOS_PENALTY must not be negative")
        if not self.temperature > 0:
            out.append(f"{p}TEMPERATURE must be positive")
        if self.ptx_coef > 0:
            if not Path(self.ptx_file).is_file():
                out.append(f"{p}PTX_FILE={self.ptx_file}: no such file (needed because {p}PTX_COEF > 0)")
            if self.ptx_batch_size < 1 or self.ptx_seq_len < 2:
                out.append(f"{p}PTX_BATCH_SIZE must be at least 1 and {p}PTX_SEQ_LEN at least 2")
        if not 0 <= self.average_decay < 1:
            out.append(f"{p}AVERAGE_DECAY must be in [0, 1) (0: publish the weights trained)")
        if self.forward_batch_size < 1:
            out.append(f"{p}FORWARD_BATCH_SIZE must be at least 1")
        return out
