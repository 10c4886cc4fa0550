"""A replica's private copies: exact bytes, read-only, bounded, gone after close, leftovers cleaned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.model_store import CorruptVersionError, ModelStore
from shared.version_copies import COPY_BYTES, PrivateCopies


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"\0" * 100)
    store = ModelStore(tmp_path / "models")
    for _ in range(3):
        store.publish("policy", src)
    return store


def test_copies_are_exact_read_only_and_bounded(store, tmp_path):
    copies = PrivateCopies(tmp_path / "copies", "policy", keep=2)
    paths = []
    for version in store.versions("policy"):
        path, size = copies.copy(store, version, store.manifest(version))
        assert size == 100 and (path / "model.safetensors").read_bytes() == b"\0" * 100
        assert (path / "model.safetensors").stat().st_mode & 0o222 == 0
        copies.promote(path)
        paths.append(path)
    assert copies.held == sorted(paths[1:]) and not paths[0].exists()
    assert copies.bytes_held == 200 and COPY_BYTES.labels("policy")._value.get() == 200
    copies.close()
    assert not copies.dir.exists() and copies.bytes_held == 0


def test_a_discarded_candidate_is_deleted_but_the_served_one_is_kept(store, tmp_path):
    copies = PrivateCopies(tmp_path / "copies", "policy")
    served, _ = copies.copy(store, "policy-0001", store.manifest("policy-0001"))
    copies.promote(served)
    candidate, _ = copies.copy(store, "policy-0002", store.manifest("policy-0002"))
    copies.discard(candidate)
    copies.discard(served)  # never deletes what is served
    assert copies.held == [served] and not candidate.exists()


def test_a_corrupt_version_leaves_no_copy(store, tmp_path):
    copies = PrivateCopies(tmp_path / "copies", "policy")
    (store.path("policy-0001") / "model.safetensors").write_bytes(b"\1" * 100)
    with pytest.raises(CorruptVersionError):
        copies.copy(store, "policy-0001", store.manifest("policy-0001"))
    assert list(copies.dir.iterdir()) == [] and copies.bytes_held == 0


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(store, tmp_path):
    root = tmp_path / "copies"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (root / f"policy-{dead.stdout.strip()}-1").mkdir(parents=True)  # a process that has exited
    (root / f"policy-{os.getppid()}-1").mkdir()  # a live one (our parent)
    (root / f"policy-{os.getpid()}-999999").mkdir()  # this pid's previous life (a restarted container)
    (root / "rm-1-1").mkdir()  # another line's: not ours to judge
    first = PrivateCopies(root, "policy")
    first.copy(store, "policy-0001", store.manifest("policy-0001"))
    second = PrivateCopies(root, "policy")  # a second follower of the line in this process
    second.copy(store, "policy-0002", store.manifest("policy-0002"))
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted([f"policy-{os.getppid()}-1", first.dir.name, second.dir.name, "rm-1-1"])
    assert len(first.held) == 1 and first.held[0].exists()  # the second did not take the first's


def test_keep_must_hold_the_served_copy(tmp_path):
    with pytest.raises(ValueError, match="served"):
        PrivateCopies(tmp_path, "policy", keep=0)
