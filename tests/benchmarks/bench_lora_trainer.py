"""Trainer memory and speed, full fine-tuning against LoRA, side by side in one run:

    .venv/bin/python tests/benchmarks/bench_lora_trainer.py [--sizes default,90m] [--steps 3] [--out DIR]

For each model size (``default``: the 0.95M-parameter default policy; ``30m`` / ``90m``: randomly
initialised Llama models with the default tokenizer) and each learner setup

  full          full fine-tuning, frozen reference copy, value model from the RM (today's trainer)
  lora          LoRA rank 8 on every linear layer, reference = base with the adapter off, RM value model
  lora+head     the same with RLHF_TRAINER_VALUE_MODEL=policy_head (no copy of any network)
  lora+head+ckpt  the same with RLHF_TRAINER_GRADIENT_CHECKPOINTING=1 (activations recomputed)

a fresh process (so that its peak RSS is its own) loads the PPOLearner from a temp store, takes one
warm-up PPO step and ``--steps`` timed steps on synthetic on-policy rollouts (8 rollouts, a chat
prompt and 32 random response tokens each; PPOConfig defaults otherwise: 4 epochs, minibatch 8),
then writes the policy as it would be published. Reported: trainable parameters, seconds per PPO
step (median); memory over the process's RSS before any model was loaded (torch, transformers and
peft imported): what the loaded learner holds, and the peak while it trains (VmHWM reset after
loading), each as a multiple of the base model's weight bytes; bytes published
and the seconds to write them. torch runs one thread (the trainer under `rlhf up` does too).

Prints a table and writes ``lora_trainer.json`` under ``--out`` (default bench-results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, int] | None] = {
    "default": None,
    "30m": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8},
    "90m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12},
}
SETUPS = {
    "full": {"policy_mode": "full", "value_model": "reward_model"},
    "lora": {"policy_mode": "lora", "value_model": "reward_model"},
    "lora+head": {"policy_mode": "lora", "value_model": "policy_head"},
    "lora+head+ckpt": {"policy_mode": "lora", "value_model": "policy_head", "gradient_checkpointing": True},
}


def build_store(root: Path, size: str) -> tuple[str, str]:
    """A store with the policy of ``size`` (policy-0001) and a reward model made from it (rm-0001)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from shared.model_store import ModelStore
    from shared.models.default_model import ensure_default_policy
    from shared.models.reward_model import RewardModel

    store = ModelStore(root)
    policy = ensure_default_policy(store)
    shape = SIZES[size]
    if shape is not None:
        src = store.path(policy)
        tokenizer = AutoTokenizer.from_pretrained(str(src))
        config = LlamaConfig.from_pretrained(str(src))
        for key, value in shape.items():
            setattr(config, key, value)
        config.num_key_value_heads = shape["num_attention_heads"]
        config.head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            LlamaForCausalLM(config).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            policy = store.publish("policy", Path(tmp), extra={"kind": f"bench-{size}"}).version
    rm = RewardModel.from_policy_dir(store.path(policy), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        rm.save(Path(tmp), AutoTokenizer.from_pretrained(str(store.path(policy))))
        rm_version = store.publish("rm", Path(tmp), parent=policy).version
    return policy, rm_version


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: peak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: "5" to /proc/self/clear_refs); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child(store_root: Path, policy: str, rm: str, setup: str, steps: int, device: str) -> dict[str, Any]:
    """One learner in this process: load, warm-up step, timed steps, publish-write; the figures."""
    import peft  # noqa: F401  (imported before the baseline: its import is not model memory)
    import torch
    from transformers import LlamaForCausalLM, LlamaModel  # noqa: F401

    from services.trainer.learner import PPOLearner
    from services.trainer.models import ModelSettings
    from services.trainer.ppo_config import PPOConfig
    from services.trainer.rollout_batch import Rollout
    from shared.model_store import ModelStore

    torch.set_num_threads(1)
    store = ModelStore(store_root)
    baseline = status_bytes("VmRSS")  # the interpreter, torch, transformers and peft, before any model
    started = time.monotonic()
    learner = PPOLearner.from_store(
        store, policy, policy, rm, PPOConfig(), ModelSettings(**SETUPS[setup], device=device)
    )
    load_s = time.monotonic() - started
    loaded_rss = status_bytes("VmRSS")  # what the learner holds: its networks (and load leftovers)
    peak_resettable = reset_peak_rss()
    generator = torch.Generator().manual_seed(0)
    vocab = len(learner.tokenizer)
    prompts = [
        learner.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {a} plus {a + 1}?"}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for a in range(8)
    ]

    def rollouts() -> list[Rollout]:
        return [
            Rollout(
                [],
                p,
                torch.randint(8, vocab, (32,), generator=generator).tolist(),
                None,
                learner.weights_version,
                "length",
                float(torch.rand((), generator=generator)),
            )
            for p in prompts
        ]

    learner.step(rollouts())  # warm-up: Adam's state, allocator
    seconds = []
    for _ in range(steps):
        batch = rollouts()
        t = time.monotonic()
        learner.step(batch)
        seconds.append(time.monotonic() - t)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.monotonic()
        out = learner.save_policy(Path(tmp) / "policy")
        write_s = time.monotonic() - t
        published = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    weights = sum(p.stat().st_size for p in store.path(policy).glob("*.safetensors"))
    return {
        "setup": setup,
        "params": sum(p.numel() for p in learner.policy.lm.parameters()),
        "trainable": learner.trainable_parameters,
        "load_s": load_s,
        "step_s": statistics.median(seconds),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "baseline_rss_bytes": baseline,
        "loaded_rss_bytes": loaded_rss,
        "training_peak_rss_bytes": status_bytes("VmHWM") if peak_resettable else None,
        "weight_bytes": weights,
        "published_bytes": published,
        "write_s": write_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="default,30m", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--setups", default="full,lora,lora+head", help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed PPO steps per setup (after one warm-up)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument(
        "--device", default="cpu", help="the learner's device: cpu, cuda or cuda:N (bf16 autocast there)"
    )
    parser.add_argument("--child", nargs=4, metavar=("STORE", "POLICY", "RM", "SETUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        store, policy, rm, setup = args.child
        print(json.dumps(child(Path(store), policy, rm, setup, args.steps, args.device)))
        return

    rows = []
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
            policy, rm = build_store(Path(tmp), size)
            for setup in args.setups.split(","):
                cmd = [sys.executable, __file__, "--steps", str(args.steps), "--device", args.device]
                cmd += ["--child", tmp, policy, rm, setup]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = {"size": size, **json.loads(done.stdout.strip().splitlines()[-1])}
                rows.append(row)
                base, weights = row["baseline_rss_bytes"], row["weight_bytes"]
                held = (row["loaded_rss_bytes"] - base) / weights
                training = (row["training_peak_rss_bytes"] or row["peak_rss_bytes"]) - base
                print(
                    f"{size:>8} {setup:>10}  params {row['params'] / 1e6:7.2f}M  trainable {row['trainable'] / 1e6:7.3f}M  "
                    f"step {row['step_s']:6.2f} s  held {held:5.1f}x weights, training peak "
                    f"{training / 2**20:6.0f} MiB over imports ({training / weights:5.1f}x)  "
                    f"published {row['published_bytes'] / 2**20:8.3f} MiB in {row['write_s']:.2f} s",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "device": args.device, "rows": rows}
    (args.out / "lora_trainer.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'lora_trainer.json'}")


if __name__ == "__main__":
    main()
