"""Contender "trl-grpo": TRL's GRPOTrainer (TRL >= 1.13 ships no PPOTrainer) on the bench spec, run in
a TRL venv by bench_trainer.py.

    <trl venv>/bin/python tests/benchmarks/trainer_bench/run_trl_grpo.py SPEC.json OUT_DIR

Same policy weights, same reward model (as a reward function scoring the completion texts), the
same number of completions per update batch (``generation_batch_size`` = batch size, as
``num_generations`` completions for each of batch/num_generations prompts), optimiser steps of
``minibatch_size`` completions, ``num_iterations`` = the PPO epochs, beta = the KL coefficient,
the same learning rate, response length and sampling (temperature 1, no top-k/top-p).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common import BenchSpec, GenerateTimer, RMScorer, RunResult, setup_threads


def main(spec_path: str, out_dir: str) -> None:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from shared.model_store import ModelStore

    setup_threads()
    spec = BenchSpec.read(Path(spec_path))
    out = Path(out_dir)
    store = ModelStore(Path(spec.store))
    store.verify(spec.policy)
    policy_dir = store.path(spec.policy)
    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    model = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32, use_safetensors=True)
    scorer = RMScorer(spec.store, spec.rm)
    timer = GenerateTimer(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    result = RunResult("trl-grpo", versions={"trl": trl.__version__, "transformers": transformers.__version__})
    started = [0.0]

    def rm_reward(prompts, completions, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = scorer.score(prompts, texts)
        samples = (len(result.curve) + 1) * len(scores)
        result.curve.append(
            {
                "t": time.monotonic() - started[0],
                "step": len(result.curve) + 1,
                "reward": sum(scores) / len(scores),
                "samples": samples,
            }
        )
        print(f"trl-grpo batch {len(result.curve)}: reward {result.curve[-1]['reward']:+.3f}", flush=True)
        return scores

    n_prompts = spec.steps * spec.batch_size // spec.num_generations
    rows = [{"prompt": spec.prompts[i % len(spec.prompts)]} for i in range(n_prompts)]
    steps_per_generation = spec.batch_size // spec.minibatch_size
    args = GRPOConfig(
        output_dir=str(out / "trl-output"),
        per_device_train_batch_size=spec.minibatch_size,
        steps_per_generation=steps_per_generation,
        num_generations=spec.num_generations,
        max_completion_length=spec.response_length,
        num_iterations=spec.epochs,
        beta=spec.kl_coef,
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=spec.steps * steps_per_generation * spec.epochs,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=spec.seed,
        dataloader_num_workers=0,
        shuffle_dataset=False,
        log_completions=False,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rm_reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    started[0], cpu_started = time.monotonic(), time.process_time()
    trainer.train()
    result.wall_s = time.monotonic() - started[0]
    result.cpu_s = time.process_time() - cpu_started
    result.steps = len(result.curve)
    result.samples = sum(spec.batch_size for _ in result.curve)
    result.generate_s, result.rollout_tokens, result.score_s = timer.seconds, timer.tokens, scorer.seconds
    result.notes.append(
        f"GRPO: {spec.num_generations} completions per prompt, group-normalised rewards, no value model"
    )
    policy_out = out / "policy"
    trainer.model.save_pretrained(policy_out)
    tokenizer.save_pretrained(policy_out)
    result.policy_dir = str(policy_out)
    result.write(out / "result.json")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
