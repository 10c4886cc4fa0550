"""The trainer's publishing as a process of its own, for bench_scale.py: in `rlhf up` (and on
Kubernetes) the trainer that writes, publishes and announces a version is another process than the
inference service that loads it, so the benchmark's publishes must not share the interpreter (and
its GIL) with the inference service and the streams it serves.

bench_scale.py starts it (``PublisherProcess``) and sends one JSON command per line on stdin; it
answers one JSON line each on stdout (anything else it prints goes to stderr):

  {"op": "prepare_adapter", "seed": S}        a new LoRA adapter of the base, in a directory -> {"bytes"}
  {"op": "prepare_full", "seed": S, "digest": D}
                                               new full weights of the base's architecture in memory,
                                               as a trainer holds them before it publishes -> {}
  {"op": "io"}                                 write + fsync + read of the base's weight bytes -> {"io_s"}
  {"op": "publish"}                            publish what was prepared, as the trainer does (full
                                               weights: services/trainer/models.py save_policy into
                                               store.staging(), hashed as written, moved in unread)
                                               -> {"version", "publish_s", "bytes"}
  {"op": "announce"}                           announce what the line owes (signed, acks=all)
                                               -> {"announced": time.monotonic() once acknowledged}
  {"op": "exit"}

A command that fails answers {"error": "..."}. ``time.monotonic()`` is CLOCK_MONOTONIC, the same
clock in every process of the machine, so the parent compares the times directly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class PublisherProcess:
    """The parent's end: starts the child and calls its commands, one at a time."""

    def __init__(self, store: Path, bootstrap: str, base: str, tmp: Path, dtype: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", __file__, "--store", str(store), "--bootstrap", bootstrap]
            + ["--base", base, "--tmp", str(tmp), "--dtype", dtype],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the publisher process ended (exit status {self.proc.wait()}) during {op}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"publisher process, {op}: {reply['error']}")
        return reply

    def announce(self) -> float:
        """Announce what the line owes, as the trainer does; the time it was acknowledged (the
        ``announce`` of tests/integration/test_adapter_serving.py's Trainer, which it stands in for)."""
        return float(self.call("announce")["announced"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("exit")
            except (RuntimeError, BrokenPipeError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve(args: argparse.Namespace, out: IO[str]) -> None:
    from services.trainer.models import save_policy
    from shared.config import KafkaConfig
    from shared.model_store import ModelStore
    from shared.models.adapters import adapter_extra
    from tests.benchmarks.bench_scale import io_baseline, new_full_model
    from tests.integration.test_adapter_serving import TARGETS, Trainer, make_adapter

    store = ModelStore(args.store)
    kafka = KafkaConfig(bootstrap_servers=args.bootstrap, delivery_timeout_s=5.0, request_timeout_ms=3000)
    trainer = Trainer(store, kafka, args.tmp)
    base, weights = args.base, store.path(args.base) / "model.safetensors"
    extra = {"adapter": adapter_extra(base_version=base, rank=8, alpha=16, target_modules=TARGETS)}
    prepared: tuple[str, Any] | None = None
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            reply: dict[str, Any] = {}
            try:
                if op == "exit":
                    break
                if op == "prepare_adapter":
                    where = args.tmp / f"adapter-{cmd['seed']}"
                    make_adapter(store.path(base), where, seed=cmd["seed"])
                    prepared = ("adapter", where)
                    reply["bytes"] = sum(p.stat().st_size for p in where.iterdir())
                elif op == "prepare_full":
                    store.digest = cmd["digest"]  # the line publishes through this store object
                    prepared = ("full", new_full_model(store, base, seed=cmd["seed"], dtype=args.dtype))
                elif op == "io":
                    reply["io_s"] = io_baseline(weights, store.root)
                elif op == "publish":
                    assert prepared is not None, "publish before prepare"
                    (kind, what), prepared = prepared, None
                    started = time.monotonic()
                    if kind == "adapter":
                        version = trainer.line.publish(what, parent=base, extra=extra).version
                    else:
                        model, tokenizer = what
                        with store.staging() as staged:
                            policy = staged / "policy"
                            hashed = save_policy(model, tokenizer, policy, digest=store.digest)
                            version = trainer.line.publish(policy, parent=base, move=True, hashed=hashed).version
                    reply["publish_s"] = time.monotonic() - started
                    reply["version"] = version
                    reply["bytes"] = sum(p.stat().st_size for p in store.path(version).iterdir())
                elif op == "announce":
                    reply["announced"] = trainer.announce()
                else:
                    reply["error"] = f"unknown op {op!r}"
            except Exception as exc:  # noqa: BLE001 - the parent reports it
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), file=out, flush=True)
    finally:
        trainer.publisher.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--bootstrap", required=True, help="the broker's bootstrap servers")
    ap.add_argument("--base", required=True, help="the base version the new versions are made of")
    ap.add_argument("--tmp", type=Path, required=True, help="a directory for the adapters it makes")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    args.tmp.mkdir(parents=True, exist_ok=True)
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the answers; everything else printed goes to stderr
    os.dup2(2, 1)
    serve(args, out)


if __name__ == "__main__":
    main()
