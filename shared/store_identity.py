"""The identity of a model store: a random id written once into ``<store>/store-id``.

    store_id = identity_of(Path("var/models"))     # created on first use, the same ever after

State that a service keeps about a store outside the versions themselves (the trainer's
checkpoints, the reward learner's SQLite state) is stamped with this id, so that state written
against one store is never read against another: a checkpoint naming ``policy-0004`` means
nothing to a store whose ``policy-0004`` is another model, or that has none.

The id is created atomically (written to a temp file, then hard-linked into place, which fails if
another process won the race: both then read the winner's id). A store copied with its files keeps
its id, which is right: it holds the same versions.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from shared.durable_files import fsync_dir, write_synced

ID_FILE = "store-id"
_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")


class StoreIdentityError(Exception):
    """The store's id file exists but does not hold an id (hand-edited, truncated)."""


def identity_of(root: Path) -> str:
    """The id of the store at ``root``, creating the store directory and its id on first use."""
    root = Path(root)
    path = root / ID_FILE
    found = read_identity(root)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-store-id-{uuid.uuid4().hex}"
    write_synced(tmp, (uuid.uuid4().hex + "\n").encode())
    try:
        os.link(tmp, path)  # fails if it exists: the first writer's id wins
        fsync_dir(root)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    found = read_identity(root)
    assert found is not None  # linked just now, by us or by whoever won
    return found


def read_identity(root: Path) -> str | None:
    """The id of the store at ``root``; None when it has none yet. StoreIdentityError when the file
    holds something else than an id."""
    path = Path(root) / ID_FILE
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    if not _ID_RE.match(text):
        raise StoreIdentityError(f"{path} does not hold a store id (32 hex digits): {text[:40]!r}")
    return text
