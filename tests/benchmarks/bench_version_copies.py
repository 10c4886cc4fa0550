"""What verifying into a private copy costs per swap, against hashing in place:

    .venv/bin/python tests/benchmarks/bench_version_copies.py [--big-mib 512] [--rounds 7]

Before signed versions a replica hashed every file of a version in the store (``ModelStore.verify``)
and the engine then read the store's files again. Now it hashes each file while copying it into
its private directory (``ModelStore.copy_verified``) and loads the copy (shared/version_copies.py):
the extra cost per swap is the write of the copy. Measured on the default model (the store's first
policy) and on one synthetic safetensors-named file of ``--big-mib`` MiB (random bytes), each read
from the page cache (the publisher just wrote it), medians of ``--rounds``. Prints one line each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from shared.model_store import ModelStore
from shared.models.default_model import ensure_default_policy


def measure(store: ModelStore, version: str, work: Path, rounds: int) -> tuple[float, float, int]:
    """(median verify s, median copy_verified s, bytes) of one version."""
    manifest = store.manifest(version)
    in_place, copied = [], []
    for i in range(rounds):
        started = time.perf_counter()
        store.verify(version)
        in_place.append(time.perf_counter() - started)
        started = time.perf_counter()
        store.copy_verified(version, manifest, work / f"copy-{i}")
        copied.append(time.perf_counter() - started)
        shutil.rmtree(work / f"copy-{i}")
    return statistics.median(in_place), statistics.median(copied), sum(d.bytes for d in manifest.files.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-copies-") as tmp:
        work = Path(tmp)
        store = ModelStore(work / "models")
        default = ensure_default_policy(store)
        big_src = work / "big"
        big_src.mkdir()
        with open(big_src / "model.safetensors", "wb") as f:
            for _ in range(args.big_mib):
                f.write(os.urandom(1 << 20))
        big = store.publish("policy", big_src, make_current=False).version
        for name, version in (("default model", default), (f"{args.big_mib} MiB file", big)):
            verify_s, copy_s, size = measure(store, version, work, args.rounds)
            mib = size / (1 << 20)
            print(
                f"{name}: {size} bytes; verify in place {verify_s * 1e3:.1f} ms ({mib / verify_s:.0f} MiB/s), "
                f"copy_verified {copy_s * 1e3:.1f} ms ({mib / copy_s:.0f} MiB/s); extra per swap "
                f"{(copy_s - verify_s) * 1e3:.1f} ms"
            )


if __name__ == "__main__":
    main()
