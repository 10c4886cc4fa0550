"""Writing files so that they survive a crash, and hashing them: what the model store and the
trainer's checkpoints both need.

    write_synced(tmp / "manifest.json", data)     # written and fsynced
    fsync_tree(tmp)                               # the new directory entries too
    os.rename(tmp, final); fsync_dir(final.parent)
    sha256_file(path)                             # (hex digest, size in bytes), read in chunks
    file_digest(path, "blake3")                   # the same under a model manifest's digest
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync the file before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: its entries, e.g. after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_path(path)


def fsync_tree(root: Path) -> None:
    """fsync every directory under ``root`` so the new entries survive a crash (files are synced on write)."""
    for dirpath, _, _ in os.walk(root):
        fsync_dir(Path(dirpath))


DIGESTS = ("sha256", "blake3")
"""File digests a model version's manifest may use: sha256 (format 1 manifests, and wherever a
standard tool must check a file) and BLAKE3 (new versions: a cryptographic hash several times faster
than sha256 per core, and parallel across cores, so that hashing stays well below the time to write
and read a large weight file; docs/benchmarks.md, "Scale ladder")."""
HASH_CHUNK = 8 << 20
"""Bytes per read when a file is hashed while it is copied: large enough for BLAKE3 to hash a
chunk on several threads."""


def new_digest(algorithm: str) -> Any:
    """A fresh hasher (``update(bytes)``, ``hexdigest()``) of ``algorithm`` (one of ``DIGESTS``)."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        import blake3

        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    raise ValueError(f"unknown digest {algorithm!r} (known: {', '.join(DIGESTS)})")


def file_digest(path: Path, algorithm: str) -> tuple[str, int]:
    """(hex digest, size in bytes) of a file's bytes under ``algorithm``, read in large chunks."""
    digest = new_digest(algorithm)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sha256_file(path: Path) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in chunks."""
    return file_digest(path, "sha256")
