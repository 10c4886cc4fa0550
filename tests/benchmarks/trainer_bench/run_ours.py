"""Contender "ours": services/trainer's PPOLearner on the bench spec (run by bench_trainer.py in the project venv).

    python tests/benchmarks/trainer_bench/run_ours.py SPEC.json OUT_DIR [--sampler-logprobs]

Loop per step: transformers ``generate`` (the learner's helper; the service samples with vLLM
instead) -> decode -> the reward model scores the texts -> ``PPOLearner.step``.

``--sampler-logprobs`` ("ours-fast"): generate also returns each token's logprob and the learner
uses them as pi_old (``recompute_logprobs=False``) instead of recomputing them, as TRL's PPO does.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common import BenchSpec, GenerateTimer, RMScorer, RunResult, setup_threads


def main(spec_path: str, out_dir: str, sampler_logprobs: bool = False) -> None:
    from services.trainer.learner import PPOLearner
    from services.trainer.ppo_config import PPOConfig
    from services.trainer.rollout_batch import Rollout
    from shared.events import Message
    from shared.model_store import ModelStore

    setup_threads()
    spec = BenchSpec.read(Path(spec_path))
    out = Path(out_dir)
    config = PPOConfig(
        lr=spec.lr,
        epochs=spec.epochs,
        minibatch_size=spec.minibatch_size,
        kl_coef=spec.kl_coef,
        seed=spec.seed,
        forward_batch_size=spec.batch_size,
        recompute_logprobs=not sampler_logprobs,
    )
    learner = PPOLearner.from_store(ModelStore(Path(spec.store)), spec.policy, spec.policy, spec.rm, config)
    scorer = RMScorer(spec.store, spec.rm)
    tok = learner.tokenizer
    timer = GenerateTimer(learner.policy.lm, tok.eos_token_id, tok.pad_token_id)
    result = RunResult("ours-fast" if sampler_logprobs else "ours", versions={"trl": "-"})
    started, cpu_started = time.monotonic(), time.process_time()
    cursor = 0
    for step in range(spec.steps):
        convs = [spec.prompts[(cursor + i) % len(spec.prompts)] for i in range(spec.batch_size)]
        cursor += spec.batch_size
        prompt_ids = [
            tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in convs
        ]
        generated = learner.generate(
            prompt_ids, spec.response_length, greedy=False, seed=spec.seed + step, return_logprobs=sampler_logprobs
        )
        responses, logprobs = generated if sampler_logprobs else (generated, [None] * len(generated))
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        scores = scorer.score(convs, texts)
        rollouts = [
            Rollout(
                [Message(**m) for m in c],
                list(p),
                r,
                lp,
                learner.weights_version,
                "stop" if r and r[-1] == tok.eos_token_id else "length",
                s,
                spec.rm,
            )
            for c, p, r, lp, s in zip(convs, prompt_ids, responses, logprobs, scores)
        ]
        stats = learner.step(rollouts)
        result.curve.append(
            {
                "t": time.monotonic() - started,
                "step": step + 1,
                "reward": sum(scores) / len(scores),
                "kl": stats.mean_kl,
                "samples": (step + 1) * spec.batch_size,
            }
        )
        print(
            f"{result.contender} step {step + 1}/{spec.steps}: reward {result.curve[-1]['reward']:+.3f} kl {stats.mean_kl:.3f} "
            f"{stats.seconds:.1f}s update",
            flush=True,
        )
    result.wall_s = time.monotonic() - started
    result.cpu_s = time.process_time() - cpu_started
    result.steps, result.samples = spec.steps, spec.steps * spec.batch_size
    result.generate_s, result.rollout_tokens, result.score_s = timer.seconds, timer.tokens, scorer.seconds
    result.policy_dir = str(learner.save_policy(out / "policy"))
    result.write(out / "result.json")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--sampler-logprobs" in sys.argv[3:])
