"""Reward service speed, side by side in one run:

    .venv/bin/python tests/benchmarks/bench_reward.py [--quick] [--items 256] [--trials 2] [--every 32]

1. Score throughput over gRPC: the same (conversation, response) items sent one per request
   ("one at a time", sequential) vs 32 per request ("batched", the scorer runs them in forward
   passes of RLHF_REWARD_MAX_BATCH_SIZE sorted by length); items/s for each and the ratio.
2. Score latency p50/p99 at batch 1 and batch 32 (sequential calls, so queueing is excluded).
3. Rating -> published RM: rankings submitted through the feedback service (gRPC) until the
   learner's count trigger fires (RLHF_REWARD_LEARN_EVERY_COMPARISONS), then the time until the
   new rm version is in the model store, for the first and the last rating of the batch; plus the
   round's own duration (manifest metric round_seconds) and the learner's histogram
   rlhf_reward_learner_rating_to_rm_seconds scraped from the service.

Everything runs as `rlhf up` would: an embedded broker, `python -m services.feedback` and
`python -m services.reward` as separate processes, on the default policy with an rm-0001 trained
offline from services/reward/data/example_rankings.jsonl first. The responses are hand-written
(an answer with or without a friendly last line, the friendly one preferred), with feedback tokens
signed by this script in the gateway's place. Prints a table and writes JSON to bench-results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from flywheel.launcher import grpc_serving
from services.reward.offline import EXAMPLE_RANKINGS, train_first_rm
from services.reward.retraining import is_heldout
from shared.config import KafkaConfig, credential_entry
from shared.events import CompletionEvent, Message, Timings
from shared.feedback_token import TokenClaims, prompt_hash, sign
from shared.grpc_channels import ClientCredentials, sync_channel
from shared.kafka.admin import ensure_topics
from shared.kafka.embedded import EmbeddedBroker, free_port
from shared.kafka.publishers import KafkaPublisher, Outbox
from shared.kafka.topics import COMPLETIONS
from shared.model_store import ModelStore
from shared.models.default_model import ensure_default_policy
from shared.pb import common_pb2, feedback_pb2, feedback_pb2_grpc, reward_pb2, reward_pb2_grpc

BENCH_TOKENS = {"gateway": "bench-gateway-grpc-token-0123456789", "trainer": "bench-trainer-grpc-token-0123456789"}

REPO = Path(__file__).resolve().parents[2]
SECRET = "bench-reward-token-secret-0123456789"
HELDOUT_FRACTION = 0.25


def log(msg: str) -> None:
    print(f"[bench-reward {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_for(check, what: str, timeout: float = 120, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def question(a: int) -> str:
    return f"What is {a} plus {a % 7 + 2}?"


def answer(a: int) -> str:
    return f"{a} plus {a % 7 + 2} is {a + a % 7 + 2}."


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class Services:
    def __init__(self, store_root: Path, state_dir: Path, every: int) -> None:
        self.broker = EmbeddedBroker().start()
        self.kafka = KafkaConfig(bootstrap_servers=self.broker.bootstrap_servers)
        ensure_topics(self.kafka)
        self.feedback_port, self.reward_port, self.metrics_port = free_port(), free_port(), free_port()
        env = {
            **os.environ,
            "RLHF_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
            "RLHF_LOG_LEVEL": "WARNING",
            "RLHF_MODEL_STORE_ROOT": str(store_root),
            "RLHF_FEEDBACK_TOKEN_SECRET": SECRET,
            "RLHF_FEEDBACK_GRPC_PORT": str(self.feedback_port),
            "RLHF_FEEDBACK_METRICS_PORT": "0",
            "RLHF_REWARD_GRPC_PORT": str(self.reward_port),
            "RLHF_REWARD_METRICS_PORT": str(self.metrics_port),
            "RLHF_REWARD_STATE_DIR": str(state_dir),
            "RLHF_REWARD_LEARN_EVERY_COMPARISONS": str(every),
            "RLHF_REWARD_LEARN_EVERY_S": "3600",
            "RLHF_REWARD_HELDOUT_FRACTION": str(HELDOUT_FRACTION),
            "RLHF_REWARD_LEARNER_LR": "1e-3",
            "RLHF_REWARD_LEARNER_EPOCHS": "3",
            "RLHF_REWARD_MAX_BATCH_SIZE": "32",
            # Auth on, as always: the benchmark calls feedback as the gateway and reward as the trainer.
            "RLHF_AUTH_ACCEPT": ",".join(credential_entry(n, t) for n, t in BENCH_TOKENS.items()),
        }
        self.procs = [
            subprocess.Popen([sys.executable, "-m", m], env=env, cwd=REPO, start_new_session=True)
            for m in ("services.feedback", "services.reward")
        ]
        wait_for(grpc_serving(f"127.0.0.1:{self.feedback_port}"), "feedback service", interval=0.3)
        wait_for(grpc_serving(f"127.0.0.1:{self.reward_port}"), "reward service", interval=0.3)
        self.inference = Outbox(KafkaPublisher(self.kafka, "inference"))

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else float("nan")

    def stop(self) -> None:
        self.inference.close()
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        self.broker.stop()


# --- 1 and 2: scoring ------------------------------------------------------------------------------


def scoring(svc: Services, n_items: int) -> dict:
    items = [
        reward_pb2.ScoreItem(
            messages=[common_pb2.ChatMessage(role="user", content=question(a))],
            response=answer(a) + (" Happy to help!" if a % 2 else ""),
        )
        for a in range(n_items)
    ]
    out = {}
    with sync_channel(f"127.0.0.1:{svc.reward_port}", ClientCredentials(token=BENCH_TOKENS["trainer"])) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        stub.Score(reward_pb2.ScoreRequest(items=items[:32]), timeout=60)  # warm-up
        for batch in (1, 32):
            latencies = []
            started = time.perf_counter()
            for i in range(0, n_items, batch):
                t = time.perf_counter()
                resp = stub.Score(reward_pb2.ScoreRequest(items=items[i : i + batch]), timeout=60)
                latencies.append(time.perf_counter() - t)
                assert len(resp.scores) == len(items[i : i + batch])
            seconds = time.perf_counter() - started
            out[f"batch{batch}"] = {
                "items": n_items,
                "requests": len(latencies),
                "seconds": seconds,
                "items_per_s": n_items / seconds,
                "p50_ms": 1000 * percentile(latencies, 50),
                "p99_ms": 1000 * percentile(latencies, 99),
            }
            log(f"batch {batch}: {n_items / seconds:.1f} items/s, p50 {1000 * percentile(latencies, 50):.1f} ms")
    out["speedup"] = out["batch32"]["items_per_s"] / out["batch1"]["items_per_s"]
    return out


# --- 3: rating -> published RM ---------------------------------------------------------------------


class Rater:
    def __init__(self, svc: Services):
        self.svc = svc
        self.channel = sync_channel(f"127.0.0.1:{svc.feedback_port}", ClientCredentials(token=BENCH_TOKENS["gateway"]))
        self.stub = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self.next_prompt = 1000

    def prompts(self, n: int, heldout: bool) -> list[int]:
        out = []
        while len(out) < n:
            a = self.next_prompt
            self.next_prompt += 1
            if is_heldout(prompt_hash([("user", question(a))]), HELDOUT_FRACTION) == heldout:
                out.append(a)
        return out

    def rate(self, prompts: list[int]) -> list[float]:
        """Serve and rank each prompt's two answers; returns each rating's acknowledgement time."""
        served = {}
        for a in prompts:
            ids = (f"b{a}-friendly", f"b{a}-plain")
            for rid, text in zip(ids, (answer(a) + " Happy to help!", answer(a))):
                self.svc.inference.publish(
                    COMPLETIONS,
                    CompletionEvent(
                        request_id=rid,
                        response_id=rid,
                        index=0,
                        n=1,
                        policy_version="policy-0001",
                        model="rlhf-policy",
                        source="user",
                        messages=[Message("user", question(a))],
                        prompt_token_ids=[],
                        completion_text=text,
                        token_ids=[],
                        logprobs=None,
                        finish_reason="stop",
                        sampling={},
                        timings=Timings(0, 0, 0),
                        created_at=time.time(),
                    ),
                    key=rid,
                )
            served[a] = ids
        assert self.svc.inference.flush(30)
        acked = []
        for a, ids in served.items():
            ph = prompt_hash([("user", question(a))])
            tokens = [sign(SECRET, TokenClaims(r, "policy-0001", ph, int(time.time()) + 3600)) for r in ids]
            self.stub.SubmitFeedback(
                feedback_pb2.SubmitFeedbackRequest(
                    ranking=feedback_pb2.Ranking(response_ids=list(ids)), feedback_tokens=tokens, user_id="bench"
                ),
                timeout=30,
            )
            acked.append(time.time())
        return acked


def rating_to_rm(svc: Services, store: ModelStore, trials: int, every: int) -> dict:
    rater = Rater(svc)
    rater.rate(rater.prompts(max(8, every // 3), heldout=True))  # the gate's held-out slice
    time.sleep(3)  # let the learner store it before the count trigger can fire
    results = []
    for trial in range(trials):
        before = set(store.versions("rm"))
        acked = rater.rate(rater.prompts(every, heldout=False))
        wait_for(lambda: set(store.versions("rm")) - before, f"a published rm (trial {trial + 1})", timeout=600)
        published = time.time()
        [version] = sorted(set(store.versions("rm")) - before)
        m = store.manifest(version).metrics
        results.append(
            {
                "version": version,
                "ratings": every,
                "first_rating_to_rm_s": published - acked[0],
                "last_rating_to_rm_s": published - acked[-1],
                "round_s": m.get("round_seconds"),
                "heldout_accuracy": m.get("heldout_accuracy"),
                "heldout_accuracy_before": m.get("heldout_accuracy_before"),
            }
        )
        log(f"trial {trial + 1}: {version}, last rating -> published {published - acked[-1]:.1f} s")
    # The learner observes its histogram just after the version lands in the store.
    wait_for(
        lambda: svc.metric("rlhf_reward_learner_rating_to_rm_seconds_count") >= trials * every,
        "the learner's rating -> RM histogram",
        timeout=30,
    )
    count = svc.metric("rlhf_reward_learner_rating_to_rm_seconds_count")
    total = svc.metric("rlhf_reward_learner_rating_to_rm_seconds_sum")
    return {
        "trials": results,
        "learner_histogram_mean_s": total / count if count else None,
        "learner_histogram_count": count,
    }


def _or(value, default):
    return default if value is None else value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=512, help="items scored per mode")
    ap.add_argument("--trials", type=int, default=3, help="rating -> RM rounds")
    ap.add_argument("--every", type=int, default=32, help="RLHF_REWARD_LEARN_EVERY_COMPARISONS")
    ap.add_argument("--quick", action="store_true", help="--items 128 --trials 2 --every 16")
    ap.add_argument("--out", default=str(REPO / "bench-results" / "reward.json"))
    args = ap.parse_args()
    if args.quick:
        args.items, args.trials, args.every = 128, 2, 16
    work = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    store = ModelStore(work / "models")
    ensure_default_policy(store)
    log("training rm-0001 offline")
    train_first_rm(store, EXAMPLE_RANKINGS, epochs=3)
    svc = Services(store.root, work / "learner", args.every)
    try:
        score = scoring(svc, args.items)
        learn = rating_to_rm(svc, store, args.trials, args.every)
    finally:
        svc.stop()
        shutil.rmtree(work, ignore_errors=True)

    b1, b32 = score["batch1"], score["batch32"]
    print("\nScore over gRPC (default policy backbone, sequential calls)")
    print(f"{'mode':<22}{'items/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'one at a time (b=1)':<22}{b1['items_per_s']:>10.1f}{b1['p50_ms']:>10.1f}{b1['p99_ms']:>10.1f}")
    print(f"{'batched (b=32)':<22}{b32['items_per_s']:>10.1f}{b32['p50_ms']:>10.1f}{b32['p99_ms']:>10.1f}")
    print(f"batched / one at a time: {score['speedup']:.1f}x")
    print(f"\nRating -> published RM (learn every {args.every} comparisons)")
    print(f"{'version':<10}{'first->rm s':>13}{'last->rm s':>12}{'round s':>9}{'acc before':>12}{'acc after':>11}")
    nan = float("nan")
    for t in learn["trials"]:
        print(
            f"{t['version']:<10}{t['first_rating_to_rm_s']:>13.1f}{t['last_rating_to_rm_s']:>12.1f}"
            f"{_or(t['round_s'], nan):>9.1f}{_or(t['heldout_accuracy_before'], nan):>12.3f}"
            f"{_or(t['heldout_accuracy'], nan):>11.3f}"
        )
    if learn["learner_histogram_mean_s"] is not None:
        print(
            f"learner's own rating->RM histogram: mean {learn['learner_histogram_mean_s']:.1f} s over "
            f"{learn['learner_histogram_count']:.0f} comparisons"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                "args": vars(args),
                "score": score,
                "rating_to_rm": learn,
            },
            indent=2,
        )
    )
    plot(score, learn, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def plot(score: dict, learn: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 4))
    modes = ["batch1", "batch32"]
    labels = ["one at a time", "batched (32)"]
    ax1.bar(labels, [score[m]["items_per_s"] for m in modes], color=["#999", "#2a7"])
    ax1.set_title("Score throughput (items/s)")
    x = range(len(modes))
    ax2.bar([i - 0.2 for i in x], [score[m]["p50_ms"] for m in modes], 0.4, label="p50")
    ax2.bar([i + 0.2 for i in x], [score[m]["p99_ms"] for m in modes], 0.4, label="p99")
    ax2.set_xticks(list(x), labels)
    ax2.set_title("Score latency per request (ms)")
    ax2.legend()
    trials = learn["trials"]
    ax3.bar(
        [t["version"] for t in trials],
        [t["first_rating_to_rm_s"] for t in trials],
        color="#47a",
        label="first rating of the batch",
    )
    ax3.bar(
        [t["version"] for t in trials],
        [_or(t["round_s"], 0.0) for t in trials],
        color="#a74",
        label="of which: training round",
    )
    ax3.set_title("Rating -> published RM (s)")
    ax3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
