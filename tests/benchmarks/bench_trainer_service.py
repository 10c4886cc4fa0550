"""Trainer service speed: where one PPO iteration's time goes, and what sampling rollouts through the
inference service's vLLM (the served version, its behaviour logprobs, continuous batching with user
traffic) costs against sampling with the trainer's own transformers model. Side by side in one run:

    .venv/bin/python tests/benchmarks/bench_trainer_service.py [--batches 8,32] [--max-tokens 48] [--trials 2]

For each batch size (rollouts per iteration), with the trainer's real parts on the default policy
(an embedded broker, the inference service with its vLLM engine, the reward service with rm-0001
trained offline on the shipped rankings, all in this process on loopback):

  sample vLLM     the batch's prompts through the inference service (GrpcPolicySampler: all in
                  flight at once, token ids + behaviour logprobs back), temperature 1
  sample HF       the same prompts sampled by the learner's transformers model (learner.generate,
                  left-padded batch, KV cache), temperature 1: the alternative to (a)
  score           the responses scored by the reward service (GrpcRewardScorer, one request)
  ppo step        PPOLearner.step on the rollouts (PPOConfig defaults: 4 epochs, minibatch 8)
  gate eval       the publish gate's held-out evaluation (16 prompts: greedy answers scored, KL on samples)
  publish         save_policy + atomic store.publish (sha256 manifest) + announcement acknowledged by Kafka

Reports the median over --trials of wall seconds per phase and completion tokens/s of both samplers,
prints a table and writes bench-results/trainer_service.json and trainer_service.png. The machine
is shared: torch runs one thread, as the trainer does under `rlhf up`.

With the tiny default model, transformers in process samples faster than vLLM through gRPC (vLLM's
per-step overhead dominates at this size) and sampling takes most of an iteration; the figures are
in docs/benchmarks.md. The gap closes with model size and on GPUs; the service samples through
inference anyway because only that gives the served version's own tokens and behaviour logprobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from services.reward.offline import EXAMPLE_RANKINGS, OFFLINE_SETTINGS, train_first_rm
from services.trainer.config import DEFAULT_PROMPT_FILE
from services.trainer.learner import PPOLearner
from services.trainer.ppo_config import PPOConfig
from services.trainer.prompts import read_prompt_file, split_heldout_prompts
from services.trainer.publishing import PolicyPublisher
from services.trainer.rollout_batch import Rollout
from services.trainer.rollout_collector import GrpcPolicySampler, GrpcRewardScorer
from shared.config import KafkaConfig, ModelStoreConfig, ServiceAuthConfig, credential_entry, load_config
from shared.grpc_channels import ClientCredentials, sync_channel
from shared.kafka.admin import ensure_topics
from shared.kafka.embedded import EmbeddedBroker
from shared.kafka.publishers import KafkaPublisher
from shared.model_store import ModelStore
from shared.models.default_model import ensure_default_policy
from shared.version_line import POLICY, KafkaAnnouncer

# Auth on, as always: the benchmark samples and scores as the trainer.
BENCH_TRAINER_TOKEN = "bench-trainer-grpc-token-0123456789"
BENCH_AUTH = ServiceAuthConfig(accept=(credential_entry("trainer", BENCH_TRAINER_TOKEN),))

REPO = Path(__file__).resolve().parents[2]
PHASES = ("sample_vllm", "sample_hf", "score", "ppo_step", "gate_eval", "publish")


def log(msg: str) -> None:
    print(f"[bench-trainer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


class LoopThread:
    """An asyncio loop in a background thread: the services run on it, the benchmark calls them synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def start_app(loop: LoopThread, app_cls, cfg, timeout: float):
    """A service app (its gRPC server on a free loopback port) started on ``loop``."""

    async def make():
        app = app_cls(cfg)
        await app.start()
        return app

    return loop.run(make(), timeout=timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,32", help="rollouts per iteration, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "trainer_service.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    broker = EmbeddedBroker().start()
    # Low group timeouts: a fresh consumer group gets its partitions in seconds, not tens of seconds.
    kafka = KafkaConfig(
        bootstrap_servers=broker.bootstrap_servers,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        delivery_timeout_s=5.0,
        request_timeout_ms=3000,
        topic_partitions=3,
    )
    ensure_topics(kafka)
    loop = LoopThread()
    try:
        store = ModelStore(work / "models")
        policy = ensure_default_policy(store)
        log("training rm-0001 (1 epoch) ...")
        rm = train_first_rm(store, EXAMPLE_RANKINGS, epochs=1, settings=OFFLINE_SETTINGS).version
        log("starting inference (vLLM) and reward services ...")
        from services.inference.app import InferenceApp
        from services.inference.config import InferenceConfig
        from services.reward.app import RewardApp
        from services.reward.config import RewardConfig

        inference_cfg = load_config(
            InferenceConfig,
            {},
            grpc_port=0,
            metrics_port=0,
            kv_cache_gib=1,
            kafka=kafka,
            model_store=ModelStoreConfig(root=store.root),
            max_model_len=512,
            default_max_tokens=32,
            max_tokens_limit=256,
            follow_updates=False,
            auth=BENCH_AUTH,
        )
        inference = start_app(loop, InferenceApp, inference_cfg, timeout=600)

        no_learner = {"learner": False} if "learner" in RewardConfig.__dataclass_fields__ else {}
        reward_cfg = load_config(
            RewardConfig,
            {},
            grpc_port=0,
            metrics_port=0,
            kafka=kafka,
            model_store=ModelStoreConfig(root=store.root),
            torch_threads=1,
            auth=BENCH_AUTH,
            **no_learner,
        )
        reward = start_app(loop, RewardApp, reward_cfg, timeout=300)
        trainer = ClientCredentials(token=BENCH_TRAINER_TOKEN)
        sampler = GrpcPolicySampler(sync_channel(inference.address, trainer), 300)
        scorer = GrpcRewardScorer(sync_channel(reward.address, trainer), 300)
        learner = PPOLearner.from_store(store, policy, policy, rm, PPOConfig())
        heldout, train = split_heldout_prompts(read_prompt_file(DEFAULT_PROMPT_FILE), 16)
        publisher = PolicyPublisher(
            store,
            KafkaAnnouncer(KafkaPublisher(kafka, "bench"), POLICY),
            scorer,
            heldout,
            max_tokens=args.max_tokens,
        )
        sampler.sample(train[:2], max_tokens=4, top_p=1.0)  # warm-up

        results = []
        for size in batches:
            trials: dict[str, list[float]] = {p: [] for p in PHASES}
            tokens_vllm, tokens_hf = [], []
            for trial in range(args.trials):
                prompts = train[trial * size : (trial + 1) * size]
                samples, t = timed(lambda: sampler.sample(prompts, max_tokens=args.max_tokens, top_p=1.0))
                trials["sample_vllm"].append(t)
                tokens_vllm.append(sum(len(s.token_ids) for s in samples))
                ids = [s.prompt_token_ids for s in samples]
                hf, t = timed(lambda: learner.generate(ids, args.max_tokens, greedy=False, seed=trial))
                trials["sample_hf"].append(t)
                tokens_hf.append(sum(len(o) for o in hf))
                usable = [s for s in samples if s.text.strip()]
                (scores, rm_version), t = timed(lambda: scorer.score([(s.prompt, s.text) for s in usable]))
                trials["score"].append(t)
                rollouts = [
                    Rollout(
                        messages=list(s.prompt),
                        prompt_token_ids=s.prompt_token_ids,
                        response_token_ids=s.token_ids,
                        behaviour_logprobs=s.logprobs,
                        policy_version=s.policy_version,
                        finish_reason=s.finish_reason,
                        score=sc,
                        rm_version=rm_version,
                    )
                    for s, sc in zip(usable, scores)
                ]
                _, t = timed(lambda: learner.step(rollouts))
                trials["ppo_step"].append(t)
                evaluation, t = timed(lambda: publisher.evaluate(learner))
                trials["gate_eval"].append(t)

                def publish():
                    publisher.publish(
                        learner, parent=policy, evaluation=evaluation, baseline_reward=None, extra={"kind": "bench"}
                    )
                    publisher.announce_pending()

                _, t = timed(publish)
                trials["publish"].append(t)
                log(f"batch {size} trial {trial + 1}: " + ", ".join(f"{p} {trials[p][-1]:.2f}s" for p in PHASES))
            median = {p: statistics.median(v) for p, v in trials.items()}
            row = {
                "batch": size,
                "seconds": median,
                "trials": trials,
                "tokens_per_s_vllm": statistics.median(tokens_vllm) / median["sample_vllm"],
                "tokens_per_s_hf": statistics.median(tokens_hf) / median["sample_hf"],
                "iteration_s": median["sample_vllm"] + median["score"] + median["ppo_step"],
            }
            results.append(row)

        print()
        header = (
            f"{'batch':>5} | "
            + " | ".join(f"{p:>11}" for p in PHASES)
            + " | iteration | vLLM tok/s | HF tok/s | vLLM/HF"
        )
        print(header)
        print("-" * len(header))
        for r in results:
            s = r["seconds"]
            print(
                f"{r['batch']:>5} | "
                + " | ".join(f"{s[p]:>10.2f}s" for p in PHASES)
                + f" | {r['iteration_s']:>8.2f}s | {r['tokens_per_s_vllm']:>10.1f} | {r['tokens_per_s_hf']:>8.1f}"
                + f" | {r['tokens_per_s_vllm'] / r['tokens_per_s_hf']:>6.2f}x"
            )
        print(
            "(iteration = sample vLLM + score + ppo step; gate eval and publish run every RLHF_TRAINER_PUBLISH_EVERY)"
        )

        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "machine": {
                "platform": platform.platform(),
                "cpus": torch.get_num_threads(),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            "settings": {
                "max_tokens": args.max_tokens,
                "trials": args.trials,
                "ppo": "PPOConfig defaults",
                "heldout_prompts": 16,
            },
            "results": results,
        }
        args.out.write_text(json.dumps(doc, indent=2))
        plot(results, args.out.with_suffix(".png"))
        log(f"wrote {args.out} and {args.out.with_suffix('.png')}")
        loop.run(reward.stop())
        loop.run(inference.stop())
    finally:
        loop.close()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        xs = [j + i * width for j in range(len(PHASES))]
        ax1.bar(xs, [r["seconds"][p] for p in PHASES], width, label=f"batch {r['batch']}")
    ax1.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(PHASES))], PHASES, rotation=20)
    ax1.set_ylabel("seconds (median)")
    ax1.set_title("one trainer iteration, by phase")
    ax1.legend()
    labels = [str(r["batch"]) for r in results]
    xs = range(len(results))
    ax2.bar([x - 0.2 for x in xs], [r["tokens_per_s_vllm"] for r in results], 0.4, label="vLLM via inference gRPC")
    ax2.bar([x + 0.2 for x in xs], [r["tokens_per_s_hf"] for r in results], 0.4, label="transformers generate")
    ax2.set_xticks(list(xs), labels)
    ax2.set_xlabel("rollouts per iteration")
    ax2.set_ylabel("completion tokens/s")
    ax2.set_title("sampling rollouts")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
