"""Adapter swap vs full-weight swap in one inference replica, under load: announcement -> served and
the pause requests see, on the default model (issue #18 item 2).

One engine with LoRA slots (RLHF_INFERENCE_LORA_ADAPTERS, the canary held beside), a real broker, PEFT
adapters of the default model published signed and announced as the trainer does. While three
streams name the canary adapter (the *other* version) and three take the served one, the benchmark
swaps the served version ``--swaps`` times to a new adapter, then ``--swaps`` times to new full
weights (a new base; only the served streams then: the adapters go with the old base). Per swap:
announcement -> served, the largest per-token gap of each stream group while it happened, and the
largest gap of the same streams in an equally long stretch before it (what the machine does anyway).

    .venv/bin/python tests/benchmarks/bench_adapter_swap.py            # 5 + 5 swaps, ~4 min on 2 quiet cores
    .venv/bin/python tests/benchmarks/bench_adapter_swap.py --swaps 2  # smoke run

Prints a table and writes bench-results/adapter_swap.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import LoopThread, start_broker, start_inference, test_signing_key, test_versions
from tests.integration.test_adapter_serving import (
    TARGETS,
    Trainer,
    gaps,
    make_adapter,
    publish_full,
    swap_under_load,
)


def one_swap(env: dict[str, Any], other: str, publish: Any) -> dict[str, float]:
    got = swap_under_load(env, other, publish)
    announced, swapped = got["announced"], got["swapped"]
    span = max(swapped - announced, 0.5)
    row = {"announce_to_served_s": swapped - announced}
    slots = env["app"].serving.adapters
    if other and slots is not None and slots.last_load:  # an adapter swap: the engine-side timings
        row.update({f"engine_{k}_ms": 1e3 * v for k, v in slots.last_load.items()})
    for group in ("main", "other"):
        if not got[group]:
            continue
        during = gaps(got[group], announced, swapped + 0.2)
        before = gaps(got[group], announced - 0.2 - span, announced - 0.2)
        row[f"{group}_max_gap_during_ms"] = 1e3 * max(during, default=0.0)
        row[f"{group}_max_gap_before_ms"] = 1e3 * max(before, default=0.0)
        row[f"{group}_p50_gap_before_ms"] = 1e3 * (statistics.median(before) if before else 0.0)
    return row


def summary(rows: list[dict[str, float]]) -> dict[str, str]:
    keys = sorted({k for r in rows for k in r})
    return {
        k: f"{statistics.median([r[k] for r in rows if k in r]):.3g} / {max(r[k] for r in rows if k in r):.3g}"
        for k in keys
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--swaps", type=int, default=5, help="swaps of each kind")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    import tempfile

    from shared.model_store import ModelStore
    from shared.models.adapters import adapter_extra
    from shared.models.default_model import ensure_default_policy

    tmp = Path(tempfile.mkdtemp(prefix="bench-adapter-swap-"))
    broker = start_broker()
    store = ModelStore(tmp / "store")
    base = ensure_default_policy(store, signer=test_signing_key())
    (tmp / "src").mkdir()
    trainer = Trainer(store, broker.kafka, tmp / "src")
    loop = LoopThread()
    app = start_inference(
        loop,
        broker.kafka,
        tmp / "store",
        versions=test_versions(copies_dir=tmp / "copies"),
        lora_adapters=True,
        lora_max_loaded=4,
        lora_max_rank=8,
        lora_canary_beside=True,
    )
    env = {"app": app, "loop": loop, "store": store, "base": base, "trainer": trainer}
    try:
        served = trainer.adapter(base, seed=1)
        canary = trainer.adapter(base, seed=2, announce=False, current=False)
        trainer.serve_canary(canary)
        deadline = time.monotonic() + 60
        while app.serving.policy_version != served or app.serving.beside_version != canary:
            assert time.monotonic() < deadline, "the first adapters were not served"
            time.sleep(0.05)
        extra = {"adapter": adapter_extra(base_version=base, rank=8, alpha=16, target_modules=TARGETS)}
        adapter_rows, full_rows = [], []
        for i in range(args.swaps):
            out = tmp / "src" / f"swap-{i}"
            make_adapter(store.path(base), out, seed=100 + i)
            adapter_rows.append(
                one_swap(env, canary, lambda out=out: trainer.line.publish(out, parent=base, extra=extra).version)
            )
            print(f"adapter swap {i + 1}: {adapter_rows[-1]}", flush=True)
        for i in range(args.swaps):
            full_rows.append(one_swap(env, "", lambda i=i: publish_full(trainer, base, seed=200 + i)))
            print(f"full-weight swap {i + 1}: {full_rows[-1]}", flush=True)
    finally:
        loop.run(app.stop())
        loop.close()
        trainer.publisher.close()
        broker.broker.stop()
    table = {"adapter": summary(adapter_rows), "full_weights": summary(full_rows)}
    print("\nmedian / max over the swaps (default model, this machine)")
    print(f"{'figure':<32} {'adapter swap':>22} {'full-weight swap':>22}")
    for key in sorted(set(table["adapter"]) | set(table["full_weights"])):
        print(f"{key:<32} {table['adapter'].get(key, '-'):>22} {table['full_weights'].get(key, '-'):>22}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "adapter_swap.json"
    path.write_text(json.dumps({"adapter": adapter_rows, "full_weights": full_rows, "summary": table}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
