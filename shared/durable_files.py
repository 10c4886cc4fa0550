"""Writing files so that they survive a crash, and hashing them: what the model store and the
trainer's checkpoints both need.

    write_synced(tmp / "manifest.json", data)     # written and fsynced
    fsync_tree(tmp)                               # the new directory entries too
    os.rename(tmp, final); fsync_dir(final.parent)
    sha256_file(path)                             # (hex digest, size in bytes), read in 1 MiB chunks
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20


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


def sha256_file(path: Path) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
