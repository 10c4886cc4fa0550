import errno
import hashlib
import json
import os
import threading
from pathlib import Path

import blake3
import pytest
import torch
from safetensors.torch import save_file

from shared import model_store
from shared.model_store import (
    CorruptVersionError,
    InvalidNameError,
    ModelStore,
    ModelStoreError,
    PublishRefusedError,
    UnknownVersionError,
    load_safetensors_state_dict,
)


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """A small publishable model directory: safetensors weights, a config and a nested file."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(4, 4, generator=gen), "b": torch.zeros(4)}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"hidden": 4}))
    (path / "sub").mkdir()
    (path / "sub" / "notes.txt").write_text("nested file")
    return path


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "src")


def test_publish_then_verify_roundtrip(store: ModelStore, src: Path) -> None:
    manifest = store.publish("policy", src)

    assert manifest.version == "policy-0001"
    assert store.verify("policy-0001") == manifest
    assert set(manifest.files) == {"model.safetensors", "config.json", "sub/notes.txt"}
    on_disk = json.loads((store.path("policy-0001") / "manifest.json").read_text())
    assert on_disk["format"] == 2 and on_disk["digest"] == "blake3"
    assert on_disk["files"]["config.json"]["bytes"] == len('{"hidden": 4}')
    state = load_safetensors_state_dict(store.path("policy-0001"))
    assert set(state) == {"w", "b"}


def test_versions_increment_and_sort_per_line(store: ModelStore, src: Path) -> None:
    for _ in range(3):
        store.publish("policy", src)
    store.publish("rm", src)

    assert store.versions("policy") == ["policy-0001", "policy-0002", "policy-0003"]
    assert store.versions("rm") == ["rm-0001"]
    assert store.latest("policy") == "policy-0003"
    assert store.latest("critic") is None


def test_parent_metrics_and_extra_recorded(store: ModelStore, src: Path) -> None:
    store.publish("policy", src)
    manifest = store.publish(
        "policy", src, parent="policy-0001", metrics={"reward": 0.25, "steps": 10}, extra={"rm_version": "rm-0003"}
    )

    reread = store.manifest(manifest.version)
    assert reread.parent == "policy-0001"
    assert reread.metrics == {"reward": 0.25, "steps": 10.0}
    assert reread.extra == {"rm_version": "rm-0003"}
    assert reread.created_at > 0


def test_publish_refuses_unknown_parent(store: ModelStore, src: Path) -> None:
    with pytest.raises(UnknownVersionError, match="policy-0009"):
        store.publish("policy", src, parent="policy-0009")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "opt.pth", "state.pkl", "sub/x.ckpt"])
def test_publish_refuses_pickle_weights(store: ModelStore, src: Path, name: str) -> None:
    (src / name).write_bytes(b"\x80\x04pickle")

    with pytest.raises(PublishRefusedError, match="pickle"):
        store.publish("policy", src)
    assert store.versions("policy") == []


def test_publish_refuses_dir_without_safetensors(store: ModelStore, tmp_path: Path) -> None:
    src = tmp_path / "nosafe"
    src.mkdir()
    (src / "config.json").write_text("{}")

    with pytest.raises(PublishRefusedError, match="safetensors"):
        store.publish("policy", src)


def test_tampered_byte_is_detected(store: ModelStore, src: Path) -> None:
    version = store.publish("policy", src).version
    weights = store.path(version) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    with pytest.raises(CorruptVersionError, match="model.safetensors does not match its blake3 digest"):
        store.verify(version)


def test_extra_file_is_detected(store: ModelStore, src: Path) -> None:
    version = store.publish("policy", src).version
    (store.path(version) / "sub" / "intruder.txt").write_text("x")

    with pytest.raises(CorruptVersionError, match="sub/intruder.txt is not listed"):
        store.verify(version)


def test_missing_file_is_detected(store: ModelStore, src: Path) -> None:
    version = store.publish("policy", src).version
    (store.path(version) / "config.json").unlink()

    with pytest.raises(CorruptVersionError, match="config.json is missing"):
        store.verify(version)


def test_leftover_tmp_dir_is_ignored(store: ModelStore, src: Path) -> None:
    store.publish("policy", src)
    leftover = store.root / ".tmp-crashed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")

    assert store.versions("policy") == ["policy-0001"]
    assert store.publish("policy", src).version == "policy-0002"


def test_failed_copy_never_becomes_visible(store: ModelStore, src: Path, monkeypatch) -> None:
    real_copy = model_store._copy_file
    copied = []

    def copy_then_fail(src_file: Path, dst_file: Path, algorithm: str):
        if copied:
            raise OSError("disk full")
        copied.append(src_file)
        return real_copy(src_file, dst_file, algorithm)

    monkeypatch.setattr(model_store, "_copy_file", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        store.publish("policy", src)

    assert copied, "the failure must happen after a file was already copied"
    assert store.versions("policy") == []
    assert store.current("policy") is None
    assert [p.name for p in store.root.iterdir()] == []  # the temp dir was cleaned up too


def test_current_pointer_and_rollback(store: ModelStore, src: Path) -> None:
    assert store.current("policy") is None
    store.publish("policy", src)
    store.publish("policy", src)
    assert store.current("policy") == "policy-0002"

    store.publish("policy", src, make_current=False)
    assert store.current("policy") == "policy-0002"

    store.set_current("policy", "policy-0001")
    assert store.current("policy") == "policy-0001"
    assert json.loads((store.root / "policy.current").read_text()) == {"version": "policy-0001"}


def test_current_falls_back_to_latest_without_pointer(store: ModelStore, src: Path) -> None:
    store.publish("policy", src, make_current=False)
    store.publish("policy", src, make_current=False)

    assert not (store.root / "policy.current").exists()
    assert store.current("policy") == "policy-0002"


def test_set_current_requires_existing_verified_version_of_the_line(store: ModelStore, src: Path) -> None:
    store.publish("policy", src)
    store.publish("rm", src)

    with pytest.raises(UnknownVersionError):
        store.set_current("policy", "policy-0007")
    with pytest.raises(InvalidNameError):
        store.set_current("policy", "rm-0001")
    (store.path("policy-0001") / "config.json").write_text("{}")
    with pytest.raises(CorruptVersionError):
        store.set_current("policy", "policy-0001")


def test_other_pointers_are_separate_from_current_and_unset_until_set(store: ModelStore, src: Path) -> None:
    store.publish("policy", src)
    store.publish("policy", src, make_current=False)
    assert store.pointer("policy", "canary") is None and store.pointer("policy", "candidate") is None
    assert store.pointer("policy", "current") == "policy-0001"
    store.set_pointer("policy", "canary", "policy-0002")
    store.set_pointer("policy", "candidate", "policy-0002", verify=False)
    assert (store.pointer("policy", "canary"), store.current("policy")) == ("policy-0002", "policy-0001")
    assert json.loads((store.root / "policy.canary").read_text()) == {"version": "policy-0002"}
    store.set_pointer("policy", "current", "policy-0002")
    assert store.current("policy") == "policy-0002"


def test_set_pointer_refuses_unknown_pointers_foreign_and_corrupt_versions(store: ModelStore, src: Path) -> None:
    store.publish("policy", src)
    store.publish("rm", src)
    with pytest.raises(InvalidNameError, match="unknown pointer"):
        store.set_pointer("policy", "announced", "policy-0001")
    with pytest.raises(InvalidNameError):
        store.set_pointer("policy", "canary", "rm-0001")
    with pytest.raises(UnknownVersionError):
        store.set_pointer("policy", "canary", "policy-0009", verify=False)
    (store.path("policy-0001") / "config.json").write_text("{}")
    with pytest.raises(CorruptVersionError):
        store.set_pointer("policy", "canary", "policy-0001")
    assert store.pointer("policy", "canary") is None
    # Pointers are written by set_pointer only, never as a free-form record.
    for name in ("current", "canary", "candidate"):
        with pytest.raises(InvalidNameError, match="pointer"):
            store.write_line_record("policy", name, {"version": "policy-0001"})
    store.write_line_record("policy", "canary-announced", {"sequence": 1})
    assert store.read_line_record("policy", "canary-announced") == {"sequence": 1}
    for bad in ("canary--announced", "-canary", "canary-", "Canary"):
        with pytest.raises(InvalidNameError):
            store.write_line_record("policy", bad, {})


def test_a_malformed_pointer_is_an_error_not_a_version(store: ModelStore, src: Path) -> None:
    store.publish("policy", src)
    (store.root / "policy.canary").write_text('{"version": "rm-0001"}')
    with pytest.raises(model_store.ModelStoreError, match="canary pointer of policy is malformed"):
        store.pointer("policy", "canary")


@pytest.mark.parametrize("bad", ["../etc", "policy-1", "policy-0001/..", "Policy-0001", "policy-0001 ", "/tmp/x", ""])
def test_bad_version_names_are_rejected(store: ModelStore, bad: str) -> None:
    for call in (store.path, store.manifest, store.verify, store.manifest_sha256):
        with pytest.raises(InvalidNameError):
            call(bad)


@pytest.mark.parametrize("bad", ["", "Policy", "po-licy", "../x", "rm1"])
def test_bad_line_names_are_rejected(store: ModelStore, src: Path, bad: str) -> None:
    with pytest.raises(InvalidNameError):
        store.publish(bad, src)
    with pytest.raises(InvalidNameError):
        store.versions(bad)


def test_manifest_sha256_matches_manifest_bytes(store: ModelStore, src: Path) -> None:
    version = store.publish("policy", src).version
    raw = (store.path(version) / "manifest.json").read_bytes()
    assert store.manifest_sha256(version) == hashlib.sha256(raw).hexdigest()


def test_concurrent_publishers_get_distinct_versions(store: ModelStore, tmp_path: Path) -> None:
    sources = [make_model_dir(tmp_path / f"src{i}", seed=i) for i in range(2)]
    published: list[str] = []
    errors: list[BaseException] = []

    def publish_five(src: Path) -> None:
        try:
            for _ in range(5):
                published.append(store.publish("policy", src).version)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=publish_five, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert sorted(published) == [f"policy-{n:04d}" for n in range(1, 11)]
    assert store.versions("policy") == sorted(published)
    for version in published:
        store.verify(version)


def test_publisher_skips_a_number_taken_while_it_copied(store: ModelStore, src: Path, monkeypatch) -> None:
    real_fsync_tree = model_store.fsync_tree
    raced: list[str] = []

    def competitor_publishes_first(root: Path) -> None:
        real_fsync_tree(root)
        if not raced:
            raced.append("started")  # before publishing: the competitor's own publish comes back here
            raced[0] = store.publish("policy", src).version

    monkeypatch.setattr(model_store, "fsync_tree", competitor_publishes_first)
    manifest = store.publish("policy", src)

    assert raced == ["policy-0001"]
    assert manifest.version == "policy-0002"
    assert store.verify("policy-0002") == manifest
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp-")] == []


# --- signatures and private copies ---------------------------------------------------------------


def test_a_signature_is_written_with_the_version_and_is_not_listed(store: ModelStore, src: Path) -> None:
    seen = []

    def sign(line: str, version: str, raw: bytes) -> bytes:
        seen.append((line, version, raw))
        return b'{"signature": "s"}\n'

    manifest = store.publish("policy", src, sign=sign)
    stored = store.read_manifest(manifest.version)
    # Signed over the exact bytes written, for the version name it got.
    assert seen == [("policy", "policy-0001", stored.raw)]
    assert stored.signature == b'{"signature": "s"}\n' and stored.manifest == manifest
    assert stored.sha256 == store.manifest_sha256("policy-0001")
    assert "manifest.sig" not in manifest.files and store.verify("policy-0001") == manifest
    assert store.read_manifest(store.publish("policy", src).version).signature is None


def test_a_failing_signer_leaves_no_version(store: ModelStore, src: Path) -> None:
    def sign(line: str, version: str, raw: bytes) -> bytes:
        raise RuntimeError("no key")

    with pytest.raises(RuntimeError):
        store.publish("policy", src, sign=sign)
    assert store.versions("policy") == [] and not list(store.root.glob(".tmp-*"))


@pytest.mark.parametrize("name", ["manifest.json", "manifest.sig"])
def test_publish_refuses_the_stores_reserved_names(store: ModelStore, src: Path, name: str) -> None:
    (src / name).write_text("{}")
    with pytest.raises(PublishRefusedError, match=f"{name} is reserved"):
        store.publish("policy", src)


def test_copy_verified_copies_exactly_the_checked_bytes(store: ModelStore, src: Path, tmp_path: Path) -> None:
    manifest = store.publish("policy", src)
    dest = tmp_path / "private" / "copy"
    size = store.copy_verified("policy-0001", manifest, dest)
    assert size == sum(d.bytes for d in manifest.files.values())
    for rel, digest in manifest.files.items():
        assert blake3.blake3((dest / rel).read_bytes()).hexdigest() == digest.hex
        assert (dest / rel).stat().st_mode & 0o222 == 0  # read-only
    # The store's file changes afterwards: the private copy does not.
    (store.path("policy-0001") / "config.json").write_text('{"hidden": 5}')
    assert json.loads((dest / "config.json").read_text()) == {"hidden": 4}


def test_copy_verified_refuses_a_changed_file_and_leaves_nothing(store: ModelStore, src: Path, tmp_path: Path) -> None:
    manifest = store.publish("policy", src)
    (store.path("policy-0001") / "config.json").write_text('{"hidden": 5}')
    with pytest.raises(CorruptVersionError, match="config.json"):
        store.copy_verified("policy-0001", manifest, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    (store.path("policy-0001") / "intruder.txt").write_text("x")
    with pytest.raises(CorruptVersionError, match="intruder.txt is not listed"):
        store.copy_verified("policy-0001", manifest, tmp_path / "copy")


def test_add_signature_signs_an_unsigned_version_once(store: ModelStore, src: Path) -> None:
    version = store.publish("policy", src).version
    store.add_signature(version, b"sig")
    assert store.read_manifest(version).signature == b"sig" and store.verify(version)
    with pytest.raises(model_store.ModelStoreError, match="already signed"):
        store.add_signature(version, b"other")
    assert not list(store.root.glob(".tmp-*"))


def test_remove_frees_a_version_whole_and_refuses_a_pointed_one(store: ModelStore, src: Path) -> None:
    first = store.publish("policy", src).version
    second = store.publish("policy", src, parent=first).version
    store.set_pointer("policy", "canary", first)
    with pytest.raises(ModelStoreError, match="policy.canary points at it"):
        store.remove(first)
    with pytest.raises(ModelStoreError, match="policy.current points at it"):
        store.remove(second)
    store.set_pointer("policy", "canary", second)
    size = store.version_bytes(first)
    assert size == sum(p.stat().st_size for p in (store.root / first).rglob("*") if p.is_file()) > 0
    assert store.remove(first) == size
    assert store.versions("policy") == [second] and not any(p.name.startswith(".tmp-") for p in store.root.iterdir())
    assert store.publish("policy", src).version == "policy-0003"  # numbers are never reused


def test_publish_move_renames_the_staged_files_without_a_copy(store: ModelStore) -> None:
    """``staging()`` + ``publish(move=True)``: the bytes the writer wrote are the version's (same
    inode: never copied), hashed as a copy would be; the staging directory is never listed and goes."""
    with store.staging() as staged:
        assert staged.parent == store.root and staged.is_dir()
        src = make_model_dir(staged / "policy")
        written = {rel: (src / rel).stat().st_ino for rel in ("model.safetensors", "config.json", "sub/notes.txt")}
        expected = {rel: blake3.blake3((src / rel).read_bytes()).hexdigest() for rel in written}
        assert store.versions("policy") == []
        manifest = store.publish("policy", src, move=True)
        assert not (src / "model.safetensors").exists()  # moved, not copied

    vdir = store.path(manifest.version)
    assert {rel: (vdir / rel).stat().st_ino for rel in written} == written
    assert {rel: d.hex for rel, d in manifest.files.items()} == expected
    assert store.verify(manifest.version) == manifest
    assert not staged.exists()
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp-")] == []


def test_publish_of_files_hashed_by_their_writer_never_reads_them(store: ModelStore, monkeypatch) -> None:
    """``publish(move=True, hashed=...)``: a file its writer hashed is renamed in unread, under the
    writer's digest, and a reader checks it like any other; a size that differs is refused."""
    with store.staging() as staged:
        src = make_model_dir(staged / "policy")
        weights = src / "model.safetensors"
        written = (blake3.blake3(weights.read_bytes()).hexdigest(), weights.stat().st_size)
        hashed_reads: list[str] = []
        real = model_store._hash_file
        monkeypatch.setattr(model_store, "_hash_file", lambda p, a: hashed_reads.append(p.name) or real(p, a))
        manifest = store.publish("policy", src, move=True, hashed={"model.safetensors": written})
    assert "model.safetensors" not in hashed_reads and "config.json" in hashed_reads
    assert (manifest.files["model.safetensors"].hex, manifest.files["model.safetensors"].bytes) == written
    monkeypatch.setattr(model_store, "_hash_file", real)
    assert store.verify(manifest.version) == manifest

    with store.staging() as staged:
        src = make_model_dir(staged / "policy")
        wrong = (written[0], written[1] + 1)
        with pytest.raises(PublishRefusedError, match="its writer hashed"):
            store.publish("policy", src, move=True, hashed={"model.safetensors": wrong})
        with pytest.raises(PublishRefusedError, match="moved in"):
            store.publish("policy", src, hashed={"model.safetensors": written})
    assert store.versions("policy") == [manifest.version]


def test_a_wrong_digest_from_the_writer_is_caught_by_the_reader(store: ModelStore) -> None:
    with store.staging() as staged:
        src = make_model_dir(staged / "policy")
        size = (src / "model.safetensors").stat().st_size
        manifest = store.publish("policy", src, move=True, hashed={"model.safetensors": ("0" * 64, size)})
    with pytest.raises(CorruptVersionError, match="model.safetensors"):
        store.verify(manifest.version)


def test_publish_move_copies_what_it_may_not_take(store: ModelStore, tmp_path: Path, monkeypatch) -> None:
    """A symlink, a file with another hard link, and (EXDEV) a file on another filesystem are copied:
    the version holds regular files of its own and the other names keep their bytes."""
    src = make_model_dir(tmp_path / "src")
    outside = tmp_path / "outside.json"
    outside.write_text('{"linked": true}')
    (src / "linked.json").symlink_to(outside)
    os.link(src / "config.json", tmp_path / "config-elsewhere.json")
    real_rename = model_store.os.rename

    def rename_across_filesystems(a: object, b: object) -> None:
        if Path(str(a)).name == "notes.txt":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(a, b)

    monkeypatch.setattr(model_store.os, "rename", rename_across_filesystems)
    manifest = store.publish("policy", src, move=True)

    vdir = store.path(manifest.version)
    for rel in ("linked.json", "config.json", "sub/notes.txt"):
        assert not (vdir / rel).is_symlink() and (vdir / rel).stat().st_nlink == 1, rel
    assert (vdir / "linked.json").read_text() == '{"linked": true}'
    assert (tmp_path / "config-elsewhere.json").read_text() == json.dumps({"hidden": 4})
    assert (src / "sub" / "notes.txt").read_text() == "nested file"  # copied, left where it was
    assert not (src / "model.safetensors").exists()  # the one file it could take was moved
    assert store.verify(manifest.version) == manifest


def test_format_1_manifests_with_sha256_digests_still_verify(store: ModelStore, src: Path) -> None:
    """Versions published before BLAKE3 (format 1: a sha256 per file, no ``digest`` field) are read
    and checked with sha256; a changed byte is still caught."""
    import hashlib

    version = store.publish("policy", src).version
    vdir = store.path(version)
    doc = json.loads((vdir / "manifest.json").read_bytes())
    doc["format"] = 1
    del doc["digest"]
    doc["files"] = {
        rel: {"sha256": hashlib.sha256((vdir / rel).read_bytes()).hexdigest(), "bytes": d["bytes"]}
        for rel, d in doc["files"].items()
    }
    (vdir / "manifest.json").write_text(json.dumps(doc))
    manifest = store.verify(version)
    assert manifest.format == 1 and manifest.digest == "sha256"
    assert json.loads(manifest.to_json())["files"] == doc["files"]  # written back in its own format
    data = bytearray((vdir / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (vdir / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match="model.safetensors does not match its sha256 digest"):
        store.verify(version)


@pytest.mark.parametrize(
    ("change", "problem"), [({"digest": "md5"}, "unknown file digest"), ({"format": 3}, "format 3")]
)
def test_a_manifest_naming_an_unknown_digest_or_format_is_malformed(
    store: ModelStore, src: Path, change: dict, problem: str
) -> None:
    version = store.publish("policy", src).version
    path = store.path(version) / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_bytes()), **change}))
    with pytest.raises(CorruptVersionError, match=problem):
        store.verify(version)


def test_a_store_set_to_sha256_publishes_format_1_manifests(tmp_path: Path, src: Path) -> None:
    """RLHF_MODEL_STORE_DIGEST=sha256 (a FIPS-approved hash): versions any reader of format 1 reads."""
    import hashlib

    store = ModelStore(tmp_path / "fips", digest="sha256")
    manifest = store.publish("policy", src)
    doc = json.loads((store.path(manifest.version) / "manifest.json").read_bytes())
    assert doc["format"] == 1 and "digest" not in doc
    weights = (store.path(manifest.version) / "model.safetensors").read_bytes()
    assert doc["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert ModelStore(tmp_path / "fips").verify(manifest.version) == manifest  # a blake3 store reads it
    with pytest.raises(ValueError, match="unknown file digest 'md5'"):
        ModelStore(tmp_path / "x", digest="md5")
