"""Training checkpoints: tensors as safetensors, everything else as JSON, published atomically.

    checkpoints = CheckpointStore(Path("var/models/.state/trainer/checkpoints"), keep=3, store_id=store_id)
    checkpoints.save(step=12, state={"learner": learner.state_dict(), "counters": {...}})
    loaded = checkpoints.load_latest(check)     # None when there is no usable complete checkpoint
    learner.load_state_dict(loaded.state["learner"])

Layout, one directory per checkpoint:

    root/ckpt-00000012/  tensors.safetensors  state.json  manifest.json
    root/.tmp-<uuid>/    a save in progress (or one a crash interrupted): never loaded, removed on start

``state`` is any nest of dicts, lists, tuples, numbers, strings, None and torch tensors (a model's
and an optimiser's ``state_dict()`` both are). Tensors go into one safetensors file under generated
keys; the rest, with a placeholder where each tensor was, into ``state.json`` (dict keys keep their
type: an optimiser's state is keyed by int). ``manifest.json`` holds the sha256 of both files; it is
written last, inside the temp directory, which is then renamed into place. So a checkpoint either
exists complete or not at all, and ``load_latest`` re-hashes before it loads: a checkpoint with no
manifest or a bad hash is skipped (logged) and the one before it is used. Nothing is unpickled.

Checkpoints belong to one model store: they name its versions (the lineage, the KL reference, the
RM the value model came from). A store given as ``store_id`` (shared.store_identity) is written into
each manifest, and ``load_latest`` sets aside (moves to ``root/.set-aside/``, logged, the newest
``keep`` kept there) a checkpoint of another store, or one the caller's ``check`` refuses (e.g. it
names a version the store lacks): the trainer then starts fresh instead of failing on a version
that is not there, and the set-aside checkpoints can no longer shadow or outlive new ones. Only the
newest ``keep`` complete checkpoints stay; the bytes they hold are the gauge
``rlhf_trainer_checkpoint_bytes``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.trainer import metrics
from shared.durable_files import fsync_dir, fsync_path, sha256_file, write_synced
from shared.logging import get_logger, log_event

log = get_logger(__name__)

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"
SET_ASIDE_DIR = ".set-aside"
FORMAT = 1
_NAME_RE = re.compile(r"^ckpt-(\d{8})$")


class CheckpointError(Exception):
    """A checkpoint is incomplete or does not match its manifest."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    path: Path
    state: dict[str, Any]


Check = Callable[[LoadedCheckpoint], str | None]
"""Why a loaded checkpoint cannot be used here (None when it can)."""


def versions_needed(state: Mapping[str, Any]) -> list[str]:
    """The store versions a trainer checkpoint (``loop.checkpoint_payload``) is restored from: the
    lineage's newest version (the learner's architecture and tokenizer), the KL reference and the RM
    the value model came from. Older lineage versions are only named, never loaded."""
    loop = state.get("loop") or {}
    lineage = loop.get("lineage") or []
    named = [lineage[-1] if lineage else None, loop.get("reference_version"), loop.get("value_rm_version")]
    return list(dict.fromkeys(v for v in named if isinstance(v, str) and v))


def missing_versions(state: Mapping[str, Any], present: Callable[[str], bool]) -> str | None:
    """A ``Check`` body: which of ``versions_needed(state)`` the store lacks (None: it has them all)."""
    missing = [v for v in versions_needed(state) if not present(v)]
    return f"it names {', '.join(missing)}, which the model store does not have" if missing else None


# --- state <-> (tensors, JSON) -------------------------------------------------------------------


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nest into (tensors by generated key, a JSON-able skeleton with placeholders)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}

    def walk(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu()
            # safetensors refuses tensors sharing storage (tied embeddings): store each view once
            # by content identity, and clone so no two stored tensors alias.
            ident = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape), t.dtype)
            if ident in seen:
                return {"__tensor__": seen[ident]}
            key = f"t{len(tensors)}"
            tensors[key] = t.contiguous().clone()
            seen[ident] = key
            return {"__tensor__": key}
        if isinstance(obj, dict):
            return {"__dict__": [[walk_key(k), walk(v)] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [walk(v) for v in obj]}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__}")

    def walk_key(key: Any) -> Any:
        if key is None or isinstance(key, (bool, int, float, str)):
            return key
        raise TypeError(f"cannot checkpoint a dict key of type {type(key).__name__}")

    return tensors, walk(state)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        raise CheckpointError(f"unknown state node {sorted(skeleton)}")
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


# --- the store -----------------------------------------------------------------------------------


class CheckpointStore:
    """Checkpoints under ``root``; keeps the newest ``keep`` complete ones. With ``store_id``, each
    is stamped with the model store it belongs to, and one of another store is never loaded."""

    def __init__(self, root: Path, keep: int = 3, *, store_id: str | None = None):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.root = Path(root)
        self.keep = keep
        self.store_id = store_id

    def steps(self) -> list[int]:
        """Steps of the checkpoint directories present (complete or not), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _NAME_RE.match(p.name)) and p.is_dir())

    def path(self, step: int) -> Path:
        return self.root / f"ckpt-{step:08d}"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` atomically (replacing one of the same step) and prune old ones."""
        if step < 0:
            raise ValueError("step must not be negative")
        tensors, skeleton = flatten_state(state)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / TENSORS_FILE))
            write_synced(tmp / STATE_FILE, json.dumps({"step": step, "state": skeleton}, allow_nan=False).encode())
            manifest: dict[str, Any] = {
                "format": FORMAT,
                "step": step,
                "files": {name: sha256_file(tmp / name)[0] for name in (TENSORS_FILE, STATE_FILE)},
            }
            if self.store_id is not None:
                manifest["store_id"] = self.store_id
            fsync_path(tmp / TENSORS_FILE)
            write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
            fsync_dir(tmp)
            final = self.path(step)
            if final.exists():  # a re-save of the same step: move the old one aside first
                stale = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def verify(self, step: int) -> dict[str, Any]:
        """The manifest of ``step`` after re-hashing its files; raises CheckpointError."""
        path = self.path(step)
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_bytes())
        except FileNotFoundError:
            raise CheckpointError(f"{path.name}: no {MANIFEST_FILE} (an interrupted save)") from None
        except ValueError as exc:
            raise CheckpointError(f"{path.name}: {MANIFEST_FILE} is malformed: {exc}") from None
        if manifest.get("format") != FORMAT or manifest.get("step") != step:
            raise CheckpointError(f"{path.name}: manifest format/step mismatch")
        files = manifest.get("files") or {}
        for name in (TENSORS_FILE, STATE_FILE):
            if name not in files:
                raise CheckpointError(f"{path.name}: {name} is not in the manifest")
            if not (path / name).is_file():
                raise CheckpointError(f"{path.name}: {name} is missing")
            if sha256_file(path / name)[0] != files[name]:
                raise CheckpointError(f"{path.name}: {name} does not match its sha256")
        return manifest

    def load(self, step: int) -> LoadedCheckpoint:
        self.verify(step)
        path = self.path(step)
        tensors = load_file(str(path / TENSORS_FILE))
        doc = json.loads((path / STATE_FILE).read_bytes())
        return LoadedCheckpoint(step, path, unflatten_state(doc["state"], tensors))

    def load_latest(self, check: Check | None = None) -> LoadedCheckpoint | None:
        """The newest checkpoint that verifies, belongs to this store and passes ``check``; broken
        ones are logged and skipped, those of another store or refused by ``check`` are set aside
        (logged). None when there is none: the caller starts fresh."""
        for step in reversed(self.steps()):
            try:
                foreign = self._other_store(step)
                if foreign is not None:
                    self._set_aside(step, foreign)
                    continue
                loaded = self.load(step)
            except (CheckpointError, OSError, ValueError, KeyError, TypeError) as exc:
                log_event(log, "skipping unusable checkpoint", level=30, step=step, error=str(exc))
                continue
            problem = check(loaded) if check is not None else None
            if problem is None:
                self._update_metrics()
                return loaded
            self._set_aside(step, problem)
        self._update_metrics()
        return None

    def _other_store(self, step: int) -> str | None:
        """Why ``step`` belongs to another store (None: to this one, or unstamped). Reads only the
        manifest: a foreign checkpoint is not hashed or loaded."""
        if self.store_id is None:
            return None
        try:
            stamped = json.loads((self.path(step) / MANIFEST_FILE).read_bytes()).get("store_id")
        except (OSError, ValueError, AttributeError):
            return None  # verify() reports it
        if stamped is None or stamped == self.store_id:
            return None  # unstamped: written before stores had ids; the caller's check decides
        return f"it belongs to model store {stamped}, not to this one ({self.store_id})"

    def _set_aside(self, step: int, reason: str) -> None:
        """Move ``step`` out of the way into ``root/.set-aside/`` (the newest ``keep`` kept there)."""
        aside = self.root / SET_ASIDE_DIR
        aside.mkdir(exist_ok=True)
        dest = aside / f"{self.path(step).name}-{uuid.uuid4().hex[:8]}"
        os.rename(self.path(step), dest)
        fsync_dir(self.root)
        log_event(
            log,
            f"checkpoint {self.path(step).name} set aside, the trainer does not resume from it: {reason}",
            level=30,
            step=step,
            reason=reason,
            moved_to=str(dest),
        )
        kept = sorted(aside.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
        for old in kept[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)

    def held_bytes(self) -> int:
        """Bytes of the checkpoint directories present (complete or not; set-aside ones included)."""
        if not self.root.is_dir():
            return 0
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                try:
                    total += (Path(dirpath) / name).stat().st_size
                except OSError:
                    pass  # removed meanwhile
        return total

    def _update_metrics(self) -> None:
        metrics.CHECKPOINTS_KEPT.set(len(self.steps()))
        metrics.CHECKPOINT_BYTES.set(self.held_bytes())

    def remove_leftovers(self) -> int:
        """Delete temp directories of interrupted saves; returns how many."""
        if not self.root.is_dir():
            return 0
        leftovers = [p for p in self.root.iterdir() if p.name.startswith(TMP_PREFIX)]
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
        return len(leftovers)

    def _prune(self) -> None:
        complete = []
        for step in reversed(self.steps()):
            if (self.path(step) / MANIFEST_FILE).is_file():
                complete.append(step)
        for step in complete[self.keep :]:
            shutil.rmtree(self.path(step), ignore_errors=True)
        self._update_metrics()
