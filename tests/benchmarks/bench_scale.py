"""The scale ladder (issue #18 item 5): full-weight versions against LoRA adapter versions, side by
side in one run, at growing model sizes.

    .venv/bin/python tests/benchmarks/bench_scale.py --quick          # 1m, 90m (~15 min on 2 cores)
    .venv/bin/python tests/benchmarks/bench_scale.py                  # 1m, 90m, 300m
    .venv/bin/python tests/benchmarks/bench_scale.py --sizes 300m --trainer-setups lora+head
    .venv/bin/python tests/benchmarks/bench_scale.py --gpu            # 1b, 3b, 8b on cuda:0 (GPU build of vLLM)

Models: randomly initialised ``LlamaForCausalLM`` with the project's tokenizer (the default policy's),
head_dim 64 (``1m`` is the default policy itself: 0.95M parameters). Per size, through the project's
own parts: a real embedded broker, the real inference service (vLLM engine, LoRA slots on, a canary
adapter held beside), versions published signed by ``VersionLine`` into a ``ModelStore`` and announced
as the trainer announces them (tests/integration/test_adapter_serving.py's helpers, shared with
bench_adapter_swap.py), the timed ones by a process of their own (publisher_process.py: in `rlhf up`
the trainer is another process than the inference service). While three streams take the served version and three name the canary adapter
(the *other* version), the served version is swapped ``--swaps`` times to a new LoRA adapter, then to
new full weights. Per swap:

  publish_s              LoRA: ``VersionLine.publish``, copied into the store; full weights: from a model in
                         memory, as the trainer publishes (services/trainer/models.py ``save_policy``):
                         written into ``store.staging()`` hashed as written and fsynced, renamed into the
                         version unread (``move=True, hashed=``), signed. The write is inside the figure
  digest                 full weights: the store's file digest (``--digests``: blake3, the default, and
                         sha256, the digest before it, side by side in one run)
  announce_to_served_s   the announcement acknowledged -> the replica serves the new version (full weights:
                         the engine's worker reads the store's file once, hashing it, and loads from it)
  pause_ms               what the swap added to the largest per-token gap: max gap while it happened
                         minus the max gap of the same streams before it (since they started)
                         (full: the served streams; LoRA: the *other* version's streams, which must not pause)
  engine_ms              the engine's own figure: full: new requests held (rlhf_inference_swap_pause_seconds),
                         LoRA: adapter load + one-token proof (rlhf_inference_adapter_load_seconds)
  engine_hold_ms         LoRA: how long the engine held its other requests while adding the adapter (vLLM's
                         add_lora between two steps, timed in the model worker:
                         rlhf_inference_adapter_engine_hold_seconds); the adapter pause target is judged on it
  io_under_load_s        full: the io baseline (below) of the same bytes, measured just before this swap's
                         publish while the same streams run: the yardstick under the same load

and once per size the baseline the full-weight path is judged against: write the same bytes to a new
file beside the store, fsync, read them back (``io_baseline_s``, with no streams running). Then, with the inference service
stopped, the trainer: bench_lora_trainer.py's child (a fresh process per setup, so that its peak RSS
is its own) for ``--trainer-setups`` (default ``full`` and ``lora+head``): seconds per PPO step, what
the loaded learner holds and its training peak, as multiples of the base's weight bytes. Full
fine-tuning is skipped where its expected peak (14x the weights) exceeds half the memory available.

The issue's targets are printed as PASS/FAIL lines. Prints progress as it goes, a table, writes
``scale.json`` and ``scale.png`` under ``--out`` (default bench-results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES: dict[str, dict[str, int] | None] = {
    "1m": None,  # the default policy
    "90m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12},
    "300m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16},
    # --gpu: Llama-3.2-1B / -3B / Llama-3-8B shapes (the project's small vocabulary: a little fewer parameters)
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32},
}
KV_HEADS = {"1b": 8, "3b": 8, "8b": 8}
SWAP_TOKENS = 10
"""Tokens each stream group makes before a swap and after it (few: a loaded CPU at 90M+ is slow)."""
FULL_TRAINER_X = 14.0
"""Full fine-tuning's training peak as a multiple of the weights (13.1x measured at 30M): the skip rule."""
MEMORY_SHARE = 0.5
"""... against this share of the memory available now: the machine is shared, others' use comes back."""
LORA_HELD_TARGET_X = 1.5
FULL_PEAK_FLOOR_X = 4.0
ADAPTER_PAUSE_TARGET_MS = 50.0
ADAPTER_SERVED_TARGET_S = 1.0
FULL_VS_IO_TARGET = 2.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} (1 / 5 min) on {len(os.sched_getaffinity(0))} cpus"


def random_model(base_dir: Path, size: str, out: Path, seed: int, dtype: str) -> None:
    """A randomly initialised Llama of ``size`` with the tokenizer and chat template of ``base_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = SHAPES[size]
    assert shape is not None
    config = LlamaConfig.from_pretrained(str(base_dir))
    for key, value in shape.items():
        setattr(config, key, value)
    config.num_key_value_heads = KV_HEADS.get(size, shape["num_attention_heads"])
    config.head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    try:
        LlamaForCausalLM(config).save_pretrained(out)
    finally:
        torch.set_default_dtype(default)
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(out)


def new_full_weights(store: Any, base: str, size: str, out: Path, seed: int, dtype: str) -> None:
    """Other random weights of ``base``'s architecture (a new base version), ready to publish."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    src = store.path(base)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "manifest.*"))
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    try:
        LlamaForCausalLM(AutoConfig.from_pretrained(src)).save_pretrained(out)
    finally:
        torch.set_default_dtype(default)


def new_full_model(store: Any, base: str, seed: int, dtype: str) -> tuple[Any, Any]:
    """Other random weights of ``base``'s architecture in memory, with its tokenizer: what a
    trainer holds before it publishes (built before the clock starts)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    src = store.path(base)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    try:
        model = LlamaForCausalLM(AutoConfig.from_pretrained(src))
    finally:
        torch.set_default_dtype(default)
    return model, AutoTokenizer.from_pretrained(str(src))


def io_baseline(src: Path, where: Path) -> float:
    """Seconds to write ``src``'s bytes to a new file in ``where``, fsync it, and read it back (the
    bytes come from memory, as a trainer's would; the read as a replica reads a fresh version)."""
    data = src.read_bytes()
    path = where / f".io-baseline-{os.getpid()}"
    try:
        started = time.monotonic()
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        return time.monotonic() - started
    finally:
        path.unlink(missing_ok=True)


def publish_copy_and_move(store: Any, base: str, size: str, root: Path, args: argparse.Namespace) -> dict[str, float]:
    """``ModelStore.publish`` of new full weights (line ``bench``, not served), median seconds over
    ``--swaps`` runs each: copied from a directory outside the store (what the trainer does today)
    and moved from ``store.staging()`` (``move=True``: no second write of the bytes)."""
    copy_s, move_s = [], []
    for i in range(args.swaps):
        out = root / "src" / f"copy-{i}"
        new_full_weights(store, base, size, out, seed=300 + i, dtype=args.dtype)
        started = time.monotonic()
        store.publish("bench", out, make_current=False)
        copy_s.append(time.monotonic() - started)
        with store.staging() as staged:
            new_full_weights(store, base, size, staged / "policy", seed=400 + i, dtype=args.dtype)
            started = time.monotonic()
            store.publish("bench", staged / "policy", make_current=False, move=True)
            move_s.append(time.monotonic() - started)
    return {"publish_copy_s": statistics.median(copy_s), "publish_move_s": statistics.median(move_s)}


def metric_total(name: str) -> tuple[float, float]:
    from prometheus_client import REGISTRY

    return (
        REGISTRY.get_sample_value(f"{name}_sum") or 0.0,
        REGISTRY.get_sample_value(f"{name}_count") or 0.0,
    )


HOLD_METRIC = "rlhf_inference_adapter_engine_hold_seconds"
"""vLLM's add_lora timed in the model worker, between two steps (worker_extension.rlhf_add_lora)."""


def timed_swap(
    env: dict[str, Any], other: str, publish_once: Any, metric: str, group: str, before: Any = None
) -> dict[str, float]:
    """One swap under load (swap_under_load), its publish timed; the figures of the module docstring.
    ``before()``, when given, runs while the streams run, just before the publish, off the clock."""
    from tests.integration.test_adapter_serving import gaps, swap_under_load

    timing: dict[str, float] = {}

    def publish() -> str:
        if before is not None:
            before()
        started = time.monotonic()
        version = publish_once()
        timing["publish_s"] = time.monotonic() - started
        return str(version)

    sum0, count0 = metric_total(metric)
    hold0, holds0 = metric_total(HOLD_METRIC)
    got = swap_under_load(env, other, publish, tokens=SWAP_TOKENS)
    sum1, count1 = metric_total(metric)
    hold1, holds1 = metric_total(HOLD_METRIC)
    announced, swapped = got["announced"], got["swapped"]
    during = gaps(got[group], announced, swapped + 0.2)
    before = gaps(got[group], 0.0, announced - 0.2)  # every gap before (few tokens: a loaded CPU is slow)
    row = {
        "publish_s": timing["publish_s"],
        "announce_to_served_s": swapped - announced,
        "max_gap_during_ms": 1e3 * max(during, default=0.0),
        "max_gap_before_ms": 1e3 * max(before, default=0.0),
        "p50_gap_before_ms": 1e3 * (statistics.median(before) if before else 0.0),
        "engine_ms": 1e3 * (sum1 - sum0) / max(count1 - count0, 1.0),
    }
    if holds1 > holds0:  # an adapter was added: how long the engine held its other requests for it
        row["engine_hold_ms"] = 1e3 * (hold1 - hold0) / (holds1 - holds0)
        # where its load went (AdapterSlots.last_load): the add (waits for the step in progress),
        # the one-token proof; announce_to_served_s - load_ms is receiving, checking and copying it
        load = env["app"].serving.adapters.last_load
        row.update({"add_ms": 1e3 * load["add_s"], "proof_ms": 1e3 * load["proof_s"], "load_ms": 1e3 * load["total_s"]})
    row["pause_ms"] = max(0.0, row["max_gap_during_ms"] - row["max_gap_before_ms"])
    return row


def serve_ladder_step(size: str, root: Path, broker: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The serving half of one size: publishes, swaps and the io baseline; leaves the store in ``root``."""
    from shared.model_store import ModelStore
    from shared.models.default_model import ensure_default_policy
    from tests.benchmarks.publisher_process import PublisherProcess
    from tests.conftest import LoopThread, start_inference, test_signing_key, test_versions
    from tests.integration.test_adapter_serving import Trainer

    store = ModelStore(root / "store")
    default = ensure_default_policy(store, signer=test_signing_key())
    (root / "src").mkdir()
    trainer = Trainer(store, broker.kafka, root / "src")
    base = default
    if SHAPES[size] is not None:
        log(f"{size}: building a random model")
        random_model(store.path(default), size, root / "src" / "base", seed=0, dtype=args.dtype)
        base = trainer.line.publish(root / "src" / "base", parent=default).version
    trainer.line.announce_pending()
    weights = store.path(base) / "model.safetensors"
    config = json.loads((store.path(base) / "config.json").read_text())
    weight_bytes = weights.stat().st_size
    log(f"{size}: base {base}, {weight_bytes / 2**20:.1f} MiB of weights; starting the inference service")
    loop = LoopThread()
    overrides: dict[str, Any] = {"dtype": args.dtype} if args.dtype != "float32" else {}
    app = start_inference(
        loop,
        broker.kafka,
        root / "store",
        versions=test_versions(copies_dir=root / "copies"),
        lora_adapters=True,
        lora_max_loaded=4,
        lora_max_rank=8,
        lora_canary_beside=True,
        **overrides,
    )
    env = {"app": app, "loop": loop, "store": store, "base": base, "trainer": trainer}
    rows: dict[str, list[dict[str, Any]]] = {"lora": [], "full": []}
    publisher = None
    try:
        served = trainer.adapter(base, seed=1)
        canary = trainer.adapter(base, seed=2, announce=False, current=False)
        trainer.serve_canary(canary)
        deadline = time.monotonic() + 300
        while app.serving.policy_version != served or app.serving.beside_version != canary:
            assert time.monotonic() < deadline, "the first adapters were not served"
            time.sleep(0.05)
        # The timed versions are made, published and announced by a process of their own, as the
        # trainer of `rlhf up` is one (publisher_process.py): not in this interpreter, which runs
        # the inference service and the streams.
        publisher = PublisherProcess(
            root / "store", broker.kafka.bootstrap_servers, base, root / "src" / "publisher", args.dtype
        )
        env["trainer"] = publisher  # swap_under_load announces through it
        published: dict[str, Any] = {}

        def publish_prepared() -> str:
            published.update(publisher.call("publish"))
            return str(published["version"])

        for i in range(args.swaps):
            publisher.call("prepare_adapter", seed=100 + i)
            row = timed_swap(env, canary, publish_prepared, "rlhf_inference_adapter_load_seconds", "other")
            row["published_bytes"] = published["bytes"]
            rows["lora"].append(row)
            log(f"{size}: LoRA swap {i + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
        io_s = [io_baseline(weights, store.root) for _ in range(args.swaps)]
        log(f"{size}: write + fsync + read of {weight_bytes / 2**20:.1f} MiB: {', '.join(f'{s:.3f}' for s in io_s)} s")
        publish_modes = publish_copy_and_move(store, base, size, root, args)
        log(f"{size}: store.publish of new full weights, copied / moved from staging: {publish_modes}")
        for d, digest in enumerate(args.digests.split(",")):
            key = "full" if d == 0 else f"full-{digest}"
            rows[key] = []
            io_now: list[float] = []
            for i in range(args.swaps):
                # what a trainer holds before it publishes, built before the clock starts
                publisher.call("prepare_full", seed=200 + 10 * d + i, digest=digest)
                # The yardstick under the same load (the streams are running): write + fsync + read
                # of the same bytes by the publishing process, just before the publish and off its
                # clock (until 7f773a5 it ran inside the timed publish and added itself to publish_s).
                row = timed_swap(
                    env,
                    "",
                    publish_prepared,
                    "rlhf_inference_swap_pause_seconds",
                    "main",
                    before=lambda: io_now.append(publisher.call("io")["io_s"]),
                )
                row["published_bytes"] = published["bytes"]
                row["io_under_load_s"] = io_now[-1]
                row["digest"] = digest
                rows[key].append(row)
                log(
                    f"{size}: full-weight swap {i + 1} ({digest}): "
                    + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k != "digest")
                )
    finally:
        if publisher is not None:
            publisher.close()
        loop.run(app.stop())
        loop.close()
        trainer.publisher.close()
    params = _count_params(config)
    return {
        "size": size,
        "params": params,
        "weight_bytes": weight_bytes,
        "io_baseline_s": statistics.median(io_s),
        **publish_modes,
        "swaps": rows,
        "base": base,
    }


def _count_params(config: dict[str, Any]) -> int:
    """Parameters of a Llama config (embeddings untied unless tie_word_embeddings; no biases)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    per_layer = attention + 3 * h * inter + 2 * h
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return int(layers * per_layer + embeddings + h)


def train_ladder_step(size: str, root: Path, base: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The trainer half: bench_lora_trainer.py's child per setup on ``base`` (an RM made from it)."""
    from transformers import AutoTokenizer

    from shared.model_store import ModelStore
    from shared.models.reward_model import RewardModel

    store = ModelStore(root / "store")
    rm = RewardModel.from_policy_dir(store.path(base), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        rm.save(Path(tmp), AutoTokenizer.from_pretrained(str(store.path(base))))
        rm_version = store.publish("rm", Path(tmp), parent=base).version
    del rm
    weight_bytes = (store.path(base) / "model.safetensors").stat().st_size
    script = Path(__file__).with_name("bench_lora_trainer.py")
    rows = []
    for setup in args.trainer_setups.split(","):
        if setup == "full" and FULL_TRAINER_X * weight_bytes > MEMORY_SHARE * mem_available():
            log(
                f"{size}: trainer {setup} skipped: needs ~{FULL_TRAINER_X * weight_bytes / 2**30:.1f} GiB, "
                f"{mem_available() / 2**30:.1f} GiB available"
            )
            continue
        log(f"{size}: trainer {setup} (a child process, {args.steps} timed PPO step(s) after a warm-up)")
        cmd = [sys.executable, str(script), "--steps", str(args.steps), "--device", args.device]
        cmd += ["--child", str(store.root), base, rm_version, setup]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"{size}: trainer {setup} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        baseline = row["baseline_rss_bytes"]
        row["held_x"] = (row["loaded_rss_bytes"] - baseline) / row["weight_bytes"]
        row["peak_x"] = ((row["training_peak_rss_bytes"] or row["peak_rss_bytes"]) - baseline) / row["weight_bytes"]
        rows.append(row)
        log(
            f"{size}: trainer {setup}: {row['step_s']:.2f} s / PPO step, held {row['held_x']:.2f}x weights, "
            f"training peak {row['peak_x']:.2f}x"
        )
    return rows


def med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows) if rows else float("nan")


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'size':>5} {'params':>8} {'weights':>9} {'path':>11} {'published':>10} {'publish s':>9} "
        f"{'ann->served s':>13} {'pause ms':>9} {'hold ms':>8} {'engine ms':>9} {'io s':>6} {'copy/move s':>12} {'s/PPO':>7} {'held x':>7} {'peak x':>7}"
    ]
    for r in results:
        trainers = {t["setup"]: t for t in r["trainer"]}
        others = [k for k in r["swaps"] if k.startswith("full-")]
        for path, setup in (("full", "full"), *((k, "") for k in others), ("lora", "lora+head")):
            rows = r["swaps"][path]
            t = trainers.get(setup)
            lines.append(
                f"{r['size']:>5} {r['params'] / 1e6:7.1f}M {r['weight_bytes'] / 2**20:7.1f}MB {path:>11} "
                f"{med(rows, 'published_bytes') / 2**20:8.2f}MB {med(rows, 'publish_s'):9.3f} "
                f"{med(rows, 'announce_to_served_s'):13.3f} {med(rows, 'pause_ms'):9.1f} "
                f"{med([x for x in rows if 'engine_hold_ms' in x], 'engine_hold_ms'):8.1f} {med(rows, 'engine_ms'):9.1f} "
                f"{r['io_baseline_s']:6.3f} "
                + (
                    f"{r.get('publish_copy_s', float('nan')):5.2f}/{r.get('publish_move_s', float('nan')):<6.2f} "
                    if path == "full"
                    else f"{'':>12} "
                )
                + (f"{t['step_s']:7.2f} {t['held_x']:7.2f} {t['peak_x']:7.2f}" if t else f"{'-':>7} {'-':>7} {'-':>7}")
            )
    return lines


def targets(results: list[dict[str, Any]]) -> list[str]:
    """The issue's targets on the largest size measured: PASS / FAIL lines."""
    out = []
    top = max(results, key=lambda r: r["params"])
    lora = top["swaps"]["lora"]
    name = top["size"]

    def line(ok: bool, what: str) -> str:
        return f"{'PASS' if ok else 'FAIL'}  {what}"

    if lora:
        # The pause is what the engine's loop spent adding the adapter between two steps, measured
        # in the worker; the clients' view (largest gap during minus before) is printed beside it:
        # on a saturated CPU one step's length varies by more than the target.
        holds = [r["engine_hold_ms"] for r in lora if "engine_hold_ms" in r]
        gap = max(r["pause_ms"] for r in lora)
        if holds:
            out.append(
                line(
                    max(holds) < ADAPTER_PAUSE_TARGET_MS,
                    f"adapter swap pause of the other version < 50 ms at {name}: the engine held them "
                    f"{max(holds):.1f} ms (max of {len(holds)}); the clients' largest gap grew by at most "
                    f"{gap:.1f} ms, with steps of {med(lora, 'p50_gap_before_ms'):.0f} ms (median gap before)",
                )
            )
        else:
            out.append(
                line(
                    gap < ADAPTER_PAUSE_TARGET_MS,
                    f"adapter swap pause of the other version < 50 ms at {name}: {gap:.1f} ms (max)",
                )
            )
        served = max(r["announce_to_served_s"] for r in lora)
        out.append(
            line(
                served < ADAPTER_SERVED_TARGET_S,
                f"adapter announcement -> served < 1 s at {name}: {served:.3f} s (max)",
            )
        )
        small = min(results, key=lambda r: r["params"])
        if small is not top and small["swaps"]["lora"]:
            a, b = med(small["swaps"]["lora"], "announce_to_served_s"), med(lora, "announce_to_served_s")
            out.append(
                line(
                    b < ADAPTER_SERVED_TARGET_S,
                    f"adapter announcement -> served, {small['size']} -> {name}: {a:.3f} -> {b:.3f} s (median; base size x{top['params'] / small['params']:.0f})",
                )
            )
    io_s = top["io_baseline_s"]
    for key, rows in top["swaps"].items():
        if not key.startswith("full") or not rows:
            continue
        total = statistics.median(r["publish_s"] + r["announce_to_served_s"] for r in rows)
        digest = rows[0].get("digest", "")
        out.append(
            line(
                total <= FULL_VS_IO_TARGET * io_s,
                f"full-weight publish -> served <= 2x write+fsync+read at {name} ({digest}): {total:.3f} s vs "
                f"2 x {io_s:.3f} s ({total / io_s:.1f}x; io measured with no streams running)",
            )
        )
        if all("io_under_load_s" in r for r in rows):
            ratios = [(r["publish_s"] + r["announce_to_served_s"]) / r["io_under_load_s"] for r in rows]
            out.append(
                line(
                    statistics.median(ratios) <= FULL_VS_IO_TARGET,
                    f"full-weight publish -> served <= 2x write+fsync+read at {name} ({digest}), each swap against "
                    f"the io of the same bytes just before it, under the same streams: median "
                    f"{statistics.median(ratios):.1f}x (swaps {', '.join(f'{x:.1f}' for x in ratios)})",
                )
            )
    for r in results:
        trainers = {t["setup"]: t for t in r["trainer"]}
        lora_t = trainers.get("lora+head")
        if lora_t:
            out.append(
                line(
                    lora_t["held_x"] <= LORA_HELD_TARGET_X,
                    f"LoRA trainer holds <= 1.5x the weights + activations at {r['size']}: held {lora_t['held_x']:.2f}x, "
                    f"activations (+ adapter's Adam) {lora_t['peak_x'] - lora_t['held_x']:.2f}x, peak {lora_t['peak_x']:.2f}x",
                )
            )
        full_t = trainers.get("full")
        if full_t:
            out.append(
                line(
                    full_t["peak_x"] > FULL_PEAK_FLOOR_X,
                    f"full fine-tuning peak above 4x at {r['size']}: {full_t['peak_x']:.2f}x",
                )
            )
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [r["params"] / 1e6 for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for path_name, marker in (("full", "o"), ("lora", "s")):
        axes[0].plot(
            params,
            [med(r["swaps"][path_name], "publish_s") for r in results],
            marker=marker,
            label=f"{path_name}: publish",
        )
        axes[0].plot(
            params,
            [med(r["swaps"][path_name], "announce_to_served_s") for r in results],
            marker=marker,
            linestyle="--",
            label=f"{path_name}: announcement -> served",
        )
        axes[1].plot(
            params,
            [med(r["swaps"][path_name], "pause_ms") for r in results],
            marker=marker,
            label=f"{path_name}: pause",
        )
    axes[0].plot(params, [r["io_baseline_s"] for r in results], color="grey", linestyle=":", label="write+fsync+read")
    axes[1].axhline(ADAPTER_PAUSE_TARGET_MS, color="grey", linestyle=":", label="50 ms target")
    for setup, marker in (("full", "o"), ("lora+head", "s")):
        xs, ys = [], []
        for r in results:
            for t in r["trainer"]:
                if t["setup"] == setup:
                    xs.append(r["params"] / 1e6)
                    ys.append(t["peak_x"])
        axes[2].plot(xs, ys, marker=marker, label=f"trainer {setup}: peak / weights")
    axes[2].axhline(LORA_HELD_TARGET_X, color="grey", linestyle=":", label="1.5x")
    for ax, title, unit in zip(
        axes, ("publish and serve", "serving pause", "trainer memory"), ("s", "ms", "x weights")
    ):
        if ax is not axes[2] or any(r["trainer"] for r in results):  # no trainer rows: --trainer-setups ''
            ax.set_xscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"scale ladder ({platform.node()}, {machine_load()})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1m,90m,300m", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--quick", action="store_true", help="--sizes 1m,90m")
    ap.add_argument("--gpu", action="store_true", help="--sizes 1b,3b,8b --device cuda:0 --dtype bfloat16")
    ap.add_argument("--swaps", type=int, default=2, help="swaps of each kind per size")
    ap.add_argument("--trainer-setups", default="full,lora+head", help="bench_lora_trainer.py setups ('' skips)")
    ap.add_argument("--steps", type=int, default=1, help="timed PPO steps per trainer setup (after one warm-up)")
    ap.add_argument("--device", default="cpu", help="the trainer's device")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights served and published")
    ap.add_argument(
        "--digests",
        default="blake3,sha256",
        help="file digests of the full-weight swaps, side by side (first: the target)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    if args.quick:
        args.sizes = "1m,90m"
    if args.gpu:
        args.sizes, args.device, args.dtype = "1b,3b,8b", "cuda:0", "bfloat16"
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        ap.error(f"--sizes: unknown {', '.join(unknown)} (known: {', '.join(SHAPES)})")

    from shared.logging import setup_logging
    from tests.conftest import start_broker

    setup_logging("bench-scale")  # the inference service's own lines: where each swap's time went
    log(f"scale ladder {sizes}; {machine_load()}; {mem_available() / 2**30:.1f} GiB available")
    broker = start_broker()
    results = []
    try:
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix=f"bench-scale-{size}-") as tmp:
                try:
                    result = serve_ladder_step(size, Path(tmp), broker, args)
                except Exception as exc:  # noqa: BLE001 - one size failing (a loaded machine) keeps the others
                    log(f"{size}: serving failed: {exc!r}; the next size")
                    continue
                result["load_during"] = machine_load()
                result["trainer"] = (
                    train_ladder_step(size, Path(tmp), result["base"], args) if args.trainer_setups else []
                )
                results.append(result)
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "scale.partial.json").write_text(json.dumps(results, indent=2, default=str))
    finally:
        broker.broker.stop()
    print()
    print(
        f"scale ladder, {platform.machine()} {len(os.sched_getaffinity(0))} cpus, trainer on {args.device}; {machine_load()}"
    )
    print("\n".join(table(results)))
    print()
    print("\n".join(targets(results)))
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "args": vars(args) | {"out": str(args.out)},
        "results": results,
        "targets": targets(results),
    }
    (args.out / "scale.json").write_text(json.dumps(doc, indent=2, default=str))
    plot(results, args.out / "scale.png")
    log(f"wrote {args.out / 'scale.json'} and {args.out / 'scale.png'}")


if __name__ == "__main__":
    main()
