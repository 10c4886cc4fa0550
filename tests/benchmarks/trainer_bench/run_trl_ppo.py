"""Contender "trl-ppo": the newest TRL release that still ships a PPOTrainer (1.12.0, as
``trl.experimental.ppo``; 1.13 removed it), on the bench spec, run in its own venv by bench_trainer.py.

    <trl-1.12 venv>/bin/python tests/benchmarks/trainer_bench/run_trl_ppo.py SPEC.json OUT_DIR

Same policy, the same reward model (our RM behind the interface TRL's ``get_reward`` expects: a
``base_model_prefix`` backbone and a ``score`` head; TRL reads it at the last non-padding token,
the EOS, like our reward service), and like ours a value model initialised from that RM. Same
batch (``per_device_train_batch_size`` x ``num_mini_batches``), minibatch, PPO epochs, KL
coefficient (k1), learning rate, response length and sampling. TRL takes its old logprobs from
``generate``'s scores (like our "ours-fast"), not from a second forward pass.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common import BenchSpec, GenerateTimer, RunResult, setup_threads


def main(spec_path: str, out_dir: str) -> None:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from shared.model_store import ModelStore
    from shared.models.reward_model import RewardModel

    class ScalarHeadAdapter(nn.Module):
        """Our RewardModel as TRL's get_reward wants it: ``getattr(m, m.base_model_prefix)`` and ``m.score(h)``."""

        base_model_prefix = "backbone"

        def __init__(self, rm: RewardModel):
            super().__init__()
            self.backbone = rm.backbone
            self.head = rm.score_head
            self.register_buffer("offset", rm.offset.detach().clone())

        def score(self, hidden: torch.Tensor) -> torch.Tensor:
            return self.head(hidden) - self.offset

    setup_threads()
    spec = BenchSpec.read(Path(spec_path))
    out = Path(out_dir)
    store = ModelStore(Path(spec.store))
    for version in (spec.policy, spec.rm):
        store.verify(version)
    policy_dir, rm_dir = store.path(spec.policy), store.path(spec.rm)
    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir), padding_side="left")

    def load_lm():
        return AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32, use_safetensors=True)

    policy, ref = load_lm(), load_lm()
    reward = ScalarHeadAdapter(RewardModel.load(rm_dir)).eval()
    value = ScalarHeadAdapter(RewardModel.load(rm_dir))
    timer = GenerateTimer(policy, tokenizer.eos_token_id, tokenizer.pad_token_id)
    result = RunResult("trl-ppo", versions={"trl": trl.__version__, "transformers": transformers.__version__})
    started = [0.0]

    class Curve(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                result.curve.append(
                    {
                        "t": time.monotonic() - started[0],
                        "step": len(result.curve) + 1,
                        "reward": float(logs["objective/scores"]),
                        "kl": float(logs.get("objective/kl", 0)),
                        "samples": (len(result.curve) + 1) * spec.batch_size,
                    }
                )
                print(f"trl-ppo step {len(result.curve)}: reward {result.curve[-1]['reward']:+.3f}", flush=True)

    rows = [
        {
            "input_ids": tokenizer.apply_chat_template(
                spec.prompts[i % len(spec.prompts)], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        }
        for i in range(spec.steps * spec.batch_size)
    ]
    args = PPOConfig(
        # TRL 1.12: batch = per_device_train_batch_size x gradient_accumulation_steps, split into
        # num_mini_batches minibatches, one optimiser step each (a micro batch holds the whole minibatch).
        output_dir=str(out / "trl-output"),
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=spec.batch_size // spec.minibatch_size,
        num_ppo_epochs=spec.epochs,
        total_episodes=spec.steps * spec.batch_size,
        local_rollout_forward_batch_size=spec.batch_size,
        response_length=spec.response_length,
        stop_token="eos",
        temperature=1.0,
        kl_coef=spec.kl_coef,
        kl_estimator="k1",
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        num_sample_generations=0,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=spec.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=Dataset.from_list(rows),
        callbacks=[Curve()],
    )
    started[0], cpu_started = time.monotonic(), time.process_time()
    trainer.train()
    result.wall_s = time.monotonic() - started[0]
    result.cpu_s = time.process_time() - cpu_started
    result.steps = len(result.curve)
    result.samples = result.steps * spec.batch_size
    result.generate_s, result.rollout_tokens = timer.seconds, timer.tokens
    policy_out = out / "policy"
    trainer.policy_model.save_pretrained(policy_out)
    tokenizer.save_pretrained(policy_out)
    result.policy_dir = str(policy_out)
    result.write(out / "result.json")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
