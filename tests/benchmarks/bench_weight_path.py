"""The full-weight path, before and after, side by side in one run (issue #18 item 4): every pass
over a version's bytes from the trainer's memory to the engine's weights, with nothing else running.

    .venv/bin/python tests/benchmarks/bench_weight_path.py                 # 300m, 4 rounds
    .venv/bin/python tests/benchmarks/bench_weight_path.py --sizes 1m,90m,300m --rounds 3

One store, one vLLM engine (services/inference/engine.py, started on the base version), one random
Llama of bench_scale.py's ``--sizes`` held in memory as a trainer holds its policy. Each round runs
the three in turn (A, B, io, A, B, io, ...: the disk and the page cache drift, so they are
interleaved, and the figures are medians):

  A  before  ``save_pretrained`` into ``store.staging()``, ``ModelStore.publish(move=True)`` (renamed,
             hashed by a read of the file, fsynced); the replica copies the version into a private
             directory hashing it (``PrivateCopies.copy``: a read and a write) and vLLM reloads from
             that copy (``VllmEngine.reload_weights``: a read). Passes: write, read, read + write, read.
  B  after   ``save_policy`` (services/trainer/models.py: written from the parameters, hashed from the
             same memory while fsync flushes), ``publish(move=True, hashed=)`` (renamed unread); the
             engine's worker reads the store's file once, hashing it, and loads from that buffer
             (``stage_weights`` + ``load_staged``). Passes: write, read.
  io         write the same bytes to a new file, fsync, read them back: the yardstick of the target
             "publish -> served at most 2x the time to write and read the bytes once".

Columns: ``writer_s`` (trainer memory -> version in the store), ``replica_s`` (version in the store ->
the engine's weights), their sum, and the sum over io. Prints progress, a table, and writes
``weight_path.json`` under ``--out`` (default bench-results/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.bench_scale import (
    FULL_VS_IO_TARGET,
    io_baseline,
    log,
    machine_load,
    new_full_model,
    random_model,
)


def one_size(size: str, rounds: int, root: Path) -> dict[str, Any]:
    from services.inference.config import InferenceConfig
    from services.inference.engine import VllmEngine
    from services.inference.weights import is_weight_file, tensor_signature
    from services.trainer.models import save_policy
    from shared.model_store import ModelStore
    from shared.models.default_model import ensure_default_policy
    from shared.version_copies import PrivateCopies
    from shared.version_line import StoreFile

    store = ModelStore(root / "store")
    base = ensure_default_policy(store)
    keep = {base}
    if size != "1m":
        log(f"{size}: building a random model")
        random_model(store.path(base), size, root / "base", seed=0, dtype="float32")
        base = store.publish("policy", root / "base", parent=base).version
        keep.add(base)
    copies = PrivateCopies(root / "copies", "policy", keep=1)
    start_dir, _ = copies.copy(store, base, store.read_manifest(base).manifest)
    copies.promote(start_dir)
    weights = store.path(base) / "model.safetensors"
    weight_bytes = weights.stat().st_size
    log(f"{size}: {weight_bytes / 2**20:.1f} MiB of weights; starting the engine")
    engine = VllmEngine(InferenceConfig())
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start(start_dir))
    signature = tensor_signature(start_dir)
    model, tokenizer = new_full_model(store, base, seed=1, dtype="float32")

    def before() -> tuple[float, float]:
        started = time.monotonic()
        with store.staging() as staged:
            out = staged / "policy"
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            version = store.publish("policy", out, parent=base, make_current=False, move=True).version
        published = time.monotonic()
        path, _ = copies.copy(store, version, store.read_manifest(version).manifest)
        loop.run_until_complete(engine.reload_weights(path))
        served = time.monotonic()
        copies.promote(path)
        return published - started, served - published

    def after() -> tuple[float, float]:
        started = time.monotonic()
        with store.staging() as staged:
            out = staged / "policy"
            hashed = save_policy(model, tokenizer, out, digest=store.digest)
            version = store.publish("policy", out, parent=base, make_current=False, move=True, hashed=hashed).version
        published = time.monotonic()
        manifest = store.read_manifest(version).manifest
        files = [
            StoreFile(rel, store.path(version) / rel, digest, manifest.digest)
            for rel, digest in manifest.files.items()
            if is_weight_file(rel)
        ]
        token = uuid.uuid4().hex
        loop.run_until_complete(engine.stage_weights(token, files))
        loop.run_until_complete(engine.load_staged(token, signature))
        served = time.monotonic()
        return published - started, served - published

    rows: dict[str, list[dict[str, float]]] = {"before": [], "after": [], "io": []}
    try:
        before()  # warm-up: the first reload also pays for vLLM's one-time setup
        for i in range(rounds):
            for name, run in (("before", before), ("after", after)):
                writer_s, replica_s = run()
                rows[name].append({"writer_s": writer_s, "replica_s": replica_s, "total_s": writer_s + replica_s})
                log(f"{size}: round {i + 1} {name}: writer {writer_s:.3f} s, replica {replica_s:.3f} s")
            io_s = io_baseline(weights, store.root)
            rows["io"].append({"total_s": io_s})
            log(f"{size}: round {i + 1} io: {io_s:.3f} s")
            for version in store.versions("policy"):
                if version not in keep:
                    _remove_version(store, version)
    finally:
        engine.shutdown()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0.1))
        loop.close()
        copies.close()
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rows.items()}
    return {"size": size, "weight_bytes": weight_bytes, "rounds": rows, "median": med}


def _remove_version(store: Any, version: str) -> None:
    """Drop a benchmark version (the store never deletes by itself); keeps the disk bounded."""
    import shutil

    shutil.rmtree(store.path(version), ignore_errors=True)


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'size':>5} {'path':>7} {'writer s':>9} {'replica s':>10} {'total s':>8} {'x io':>6} {'io s':>6}",
    ]
    for r in results:
        io = r["median"]["io"]["total_s"]
        for name in ("before", "after"):
            m = r["median"][name]
            lines.append(
                f"{r['size']:>5} {name:>7} {m['writer_s']:9.3f} {m['replica_s']:10.3f} {m['total_s']:8.3f} "
                f"{m['total_s'] / io:6.2f} {io:6.3f}"
            )
        a, b = r["median"]["before"]["total_s"], r["median"]["after"]["total_s"]
        lines.append(f"{r['size']:>5} after/before: {b / a:.2f}x of the time")
    return lines


def targets(results: list[dict[str, Any]]) -> list[str]:
    top = max(results, key=lambda r: r["weight_bytes"])
    io, total = top["median"]["io"]["total_s"], top["median"]["after"]["total_s"]
    ok = total <= FULL_VS_IO_TARGET * io
    return [
        f"{'PASS' if ok else 'FAIL'}  full-weight trainer memory -> engine weights <= 2x write+fsync+read at "
        f"{top['size']}: {total:.3f} s vs 2 x {io:.3f} s ({total / io:.2f}x; medians, interleaved)"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="300m", help="comma-separated: 1m, 90m, 300m (bench_scale.py's shapes)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    log(f"weight path, before and after: sizes {args.sizes}, {args.rounds} rounds; {machine_load()}")
    results = []
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"weight-path-{size}-", dir=os.environ.get("TMPDIR")) as tmp:
            results.append(one_size(size, args.rounds, Path(tmp)))
    lines = table(results)
    print("\n".join(lines))
    print("\n".join(targets(results)))
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
        "table": lines,
        "targets": targets(results),
        "load_after": machine_load(),
    }
    (args.out / "weight_path.json").write_text(json.dumps(doc, indent=2))
    log(f"wrote {args.out / 'weight_path.json'}")


if __name__ == "__main__":
    main()
