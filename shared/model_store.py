"""The versioned model store: one immutable, checksummed directory per published model version.

    root/
      policy-0001/  manifest.json  manifest.sig  model.safetensors  config.json  tokenizer.json ...
      policy-0002/  ...
      rm-0001/      ...
      policy.current          {"version": "policy-0002"}
      policy.announced        the last signed announcement of the line (see version_line.py)
      policy.candidate        more pointers of the line (``set_pointer``): the trainer's candidate,
      policy.canary           the version the canary replicas serve (progressive rollout)
      policy.canary-announced   each pointer's own last signed announcement
      .tmp-3f2a.../           a publish in progress (or a crashed one); never listed

A version is named ``<line>-<NNNN>``; a *line* is a family of versions (``policy``, ``rm``).
``manifest.json`` lists the digest (BLAKE3 for new versions, sha256 in format 1 manifests; see
``durable_files.DIGESTS``) and size of every other file in the directory, so a reader can
``verify`` a version before loading it, and a Kafka announcement can carry ``manifest_sha256`` so
the receiver knows it read the manifest the publisher wrote. ``manifest.sig`` (optional here; the
version lines require it when a follower has verify keys) is the publisher's signature of the
manifest's exact bytes (shared/signing.py); it is written into the temp directory before the
rename, so a version appears with its signature or not at all, and it is not listed in the manifest.

Publication is atomic: files are copied into a private temp directory inside ``root`` (same
filesystem), fsynced, and renamed to the version name in one step, so a reader never sees a
half-written version. Weights must be safetensors: pickle-based formats can run code when loaded.

    store = ModelStore(Path("var/models"))
    version = store.publish("policy", out_dir, parent="policy-0001", metrics={"reward": 0.4}).version
    store.verify(version)                                   # on the reading side, before loading
    state = load_safetensors_state_dict(store.path(version))

A replica that must load exactly the bytes it verified (the store is writable by others) copies
them instead: ``copy_verified(version, manifest, private_dir)`` hashes each file while copying it
(one read) and loads from the private copy, which nobody else can change after the check.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.durable_files import (
    DIGESTS,
    HASH_CHUNK,
    file_digest,
    fsync_dir,
    fsync_path,
    fsync_tree,
    new_digest,
    write_synced,
)

if TYPE_CHECKING:
    import torch

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
"""The publisher's signature of the manifest; beside it, not listed in it (see shared/signing.py)."""
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
MANIFEST_FORMAT = 2
"""Format of the manifests this code writes: 2 names the file digest (``digest``); 1 (sha256, no
``digest`` field) is still read."""
MANIFEST_FORMATS = (1, 2)
DEFAULT_DIGEST = "blake3"
"""The file digest of new versions (durable_files.DIGESTS)."""
# Weight formats that are unpickled on load (and so can execute arbitrary code): never stored.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
TMP_PREFIX = ".tmp-"
_LINE_RE = re.compile(r"^[a-z]+\Z")  # \Z, not $: no trailing newline; ASCII only
_RECORD_RE = re.compile(r"^[a-z]+(-[a-z]+)*\Z")
CURRENT = "current"
POINTERS = frozenset({CURRENT, "candidate", "canary"})
"""The pointers a line may have (``<line>.<pointer>``): written by publish, set_current and set_pointer only."""
_VERSION_RE = re.compile(r"^([a-z]+)-([0-9]{4,})\Z")


class ModelStoreError(Exception):
    """Base of every model store error."""


class InvalidNameError(ModelStoreError, ValueError):
    """A line or version name that does not match the naming scheme (or tries path traversal)."""


class UnknownVersionError(ModelStoreError):
    """The version is not in the store."""


class PublishRefusedError(ModelStoreError):
    """The source directory may not be published (pickle weights, no safetensors, bad metadata)."""


class CorruptVersionError(ModelStoreError):
    """A published version does not match its manifest; the message names the file and the problem."""


@dataclass(frozen=True)
class FileDigest:
    hex: str
    """The file's digest (hex) under its manifest's ``digest`` algorithm."""
    bytes: int


@dataclass(frozen=True)
class StoredManifest:
    """A version's manifest as read once: its exact bytes, parsed, and its signature document."""

    version: str
    raw: bytes
    manifest: Manifest
    signature: bytes | None
    """The bytes of ``manifest.sig``; None when the version is unsigned."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """The contents of a version's ``manifest.json``."""

    version: str
    line: str
    parent: str | None
    created_at: float
    """Unix time of publication."""
    files: dict[str, FileDigest]
    """Every file of the version except the manifest, by POSIX path relative to the version dir."""
    metrics: dict[str, float]
    extra: dict[str, Any]
    """Free-form JSON metadata, e.g. the reward model version a policy was trained against."""
    format: int = MANIFEST_FORMAT
    digest: str = DEFAULT_DIGEST
    """The algorithm of every file's digest (durable_files.DIGESTS); sha256 in format 1."""

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "version": self.version,
            "line": self.line,
            "parent": self.parent,
            "created_at": self.created_at,
            "files": {p: {self.digest: d.hex, "bytes": d.bytes} for p, d in sorted(self.files.items())},
            "metrics": self.metrics,
            "extra": self.extra,
            "format": self.format,
        }
        if self.format >= 2:
            doc["digest"] = self.digest
        return json.dumps(doc, indent=2, allow_nan=False).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse a manifest; raises ValueError (or KeyError/TypeError) when it is malformed."""
        doc = json.loads(raw)
        if doc.get("format") not in MANIFEST_FORMATS:
            raise ValueError(f"unsupported manifest format {doc.get('format')!r}")
        algorithm = doc["digest"] if doc["format"] >= 2 else "sha256"
        if algorithm not in DIGESTS:
            raise ValueError(f"unknown file digest {algorithm!r}")
        files = {}
        for rel, digest in doc["files"].items():
            _check_relative_path(rel)
            files[rel] = FileDigest(hex=str(digest[algorithm]), bytes=int(digest["bytes"]))
        return cls(
            version=doc["version"],
            line=doc["line"],
            parent=doc["parent"],
            created_at=float(doc["created_at"]),
            files=files,
            metrics={str(k): float(v) for k, v in doc["metrics"].items()},
            extra=dict(doc["extra"]),
            format=doc["format"],
            digest=algorithm,
        )


class ModelStore:
    """A model store rooted at ``root``; safe for concurrent readers and publishers (threads or processes)."""

    def __init__(self, root: Path, digest: str = DEFAULT_DIGEST):
        if digest not in DIGESTS:
            raise ValueError(f"unknown file digest {digest!r} (known: {', '.join(DIGESTS)})")
        self.root = Path(root)
        self.digest = digest
        """The digest of the files of the versions this store object publishes (readers follow each
        manifest's own)."""

    # --- reading ---------------------------------------------------------------------------

    def versions(self, line: str) -> list[str]:
        """Published versions of ``line``, oldest first."""
        return [f"{line}-{n:04d}" for n in self._numbers(line)]

    def latest(self, line: str) -> str | None:
        versions = self.versions(line)
        return versions[-1] if versions else None

    def path(self, version: str) -> Path:
        """Directory of a published version."""
        _parse_version(version)
        path = self.root / version
        if not path.is_dir():
            raise UnknownVersionError(f"model version {version} is not in the store at {self.root}")
        return path

    def manifest(self, version: str) -> Manifest:
        """The parsed manifest of ``version`` (not checked against the files: see ``verify``)."""
        return self.read_manifest(version).manifest

    def read_manifest(self, version: str) -> StoredManifest:
        """The manifest's bytes (read once), parsed, with the signature beside it (None: unsigned)."""
        vdir = self.path(version)
        try:
            raw = (vdir / MANIFEST_NAME).read_bytes()
        except FileNotFoundError:
            raise CorruptVersionError(f"{version}: {MANIFEST_NAME} is missing") from None
        try:
            manifest = Manifest.from_json(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptVersionError(f"{version}: {MANIFEST_NAME} is malformed: {exc}") from None
        if manifest.version != version or manifest.line != _parse_version(version)[0]:
            raise CorruptVersionError(
                f"{version}: {MANIFEST_NAME} describes {manifest.version} of line {manifest.line}"
            )
        try:
            signature: bytes | None = (vdir / SIGNATURE_NAME).read_bytes()
        except FileNotFoundError:
            signature = None
        return StoredManifest(version, raw, manifest, signature)

    def manifest_sha256(self, version: str) -> str:
        """sha256 of the manifest's bytes: identifies the exact contents of a version in one hash."""
        return hashlib.sha256((self.path(version) / MANIFEST_NAME).read_bytes()).hexdigest()

    def verify(self, version: str) -> Manifest:
        """Re-hash every file of ``version`` against its manifest; raises CorruptVersionError on any difference."""
        manifest = self.manifest(version)
        vdir = self._listed_dir(version, manifest)
        for rel, expected in sorted(manifest.files.items()):
            _check_digest(version, rel, _hash_file(vdir / rel, manifest.digest), expected, manifest.digest)
        return manifest

    def copy_verified(
        self, version: str, manifest: Manifest, dest: Path, skip: Callable[[str], bool] | None = None
    ) -> int:
        """Copy every file of ``version`` into the new directory ``dest``, hashing each as it is
        copied (one read), and check it against ``manifest`` (one the caller read and trusts, e.g.
        whose signature it verified). Returns the bytes copied; CorruptVersionError (``dest``
        removed) on any difference. What lands in ``dest`` is exactly what was checked, whatever
        happens to the store's files afterwards. Files for which ``skip(relative path)`` is true
        are left out: their reader checks them against the manifest as it reads them."""
        vdir = self._listed_dir(version, manifest)
        dest = Path(dest)
        dest.mkdir(parents=True)
        total = 0
        try:
            for rel, expected in sorted(manifest.files.items()):
                if skip is not None and skip(rel):
                    continue
                # Not fsynced: a private copy does not outlive a crash (its directory is wiped on start).
                actual = _copy_file(vdir / rel, dest / rel, manifest.digest, sync=False)
                _check_digest(version, rel, actual, expected, manifest.digest)
                os.chmod(dest / rel, 0o444)
                total += actual.bytes
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return total

    def _listed_dir(self, version: str, manifest: Manifest) -> Path:
        """The version's directory, after checking that its files are exactly the manifest's."""
        vdir = self.path(version)
        on_disk = {rel for rel in _relative_files(vdir) if rel not in RESERVED_NAMES}
        unlisted = sorted(on_disk - manifest.files.keys())
        if unlisted:
            raise CorruptVersionError(f"{version}: file {unlisted[0]} is not listed in the manifest")
        problem = _weight_format_problem(manifest.files)
        if problem:
            raise CorruptVersionError(f"{version}: {problem}")
        missing = sorted(manifest.files.keys() - on_disk)
        if missing:
            raise CorruptVersionError(f"{version}: file {missing[0]} is missing")
        return vdir

    def current(self, line: str) -> str | None:
        """The version serving for ``line``: the pointer if set, else the latest version (None if no versions)."""
        _check_line(line)
        try:
            raw = self._pointer_path(line).read_bytes()
        except FileNotFoundError:
            return self.latest(line)
        try:
            version = json.loads(raw)["version"]
            if _parse_version(version)[0] != line:
                raise ValueError(f"{version} is not a version of {line}")
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelStoreError(f"current pointer of {line} is malformed: {exc}") from None
        return version

    def pointer(self, line: str, name: str) -> str | None:
        """The version ``<line>.<name>`` points at: ``current`` as ``current()`` (the latest version
        when unset); any other pointer None when unset."""
        if name == CURRENT:
            return self.current(line)
        _check_line(line)
        _check_pointer(name)
        doc = self.read_line_record(line, name)
        if doc is None:
            return None
        try:
            version = doc["version"]
            if _parse_version(version)[0] != line:
                raise ValueError(f"{version} is not a version of {line}")
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelStoreError(f"{name} pointer of {line} is malformed: {exc}") from None
        return str(version)

    # --- writing ---------------------------------------------------------------------------

    def publish(
        self,
        line: str,
        src_dir: Path,
        *,
        parent: str | None = None,
        metrics: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
        make_current: bool = True,
        sign: Callable[[str, str, bytes], bytes] | None = None,
        move: bool = False,
        hashed: Mapping[str, tuple[str, int]] | None = None,
    ) -> Manifest:
        """Copy ``src_dir`` into the store as the next version of ``line`` and return its manifest.

        ``sign(line, version, manifest bytes)`` returns the signature document written beside the
        manifest (``manifest.sig``) before the version becomes visible; None: unsigned.

        ``move``: the caller gives ``src_dir``'s files up; each is renamed into the version instead
        of copied (hashed by one read and fsynced, no second write of its bytes), or copied where it
        lies on another filesystem. Write the files into ``staging()`` to be sure of the rename.

        ``hashed`` (with ``move``): relative path -> (hex digest under this store's ``digest``,
        bytes) of files the caller wrote, fsynced, and hashed as it wrote them
        (shared/models/safetensors_io.py): renamed in without being read at all. Their size is
        checked; a reader checks every byte against the digest, as for any version."""
        _check_line(line)
        if hashed and not move:
            raise PublishRefusedError("hashed files are moved in (move=True), never copied unread")
        src_dir = Path(src_dir)
        if not src_dir.is_dir():
            raise PublishRefusedError(f"refusing to publish {src_dir}: not a directory")
        src_files = _relative_files(src_dir)
        problem = _weight_format_problem(src_files) or (
            f"{', '.join(sorted(RESERVED_NAMES & set(src_files)))} is reserved for the store"
            if RESERVED_NAMES & set(src_files)
            else None
        )
        if problem:
            raise PublishRefusedError(f"refusing to publish {src_dir}: {problem}")
        if parent is not None:
            self.path(parent)
        try:
            metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
            extra = dict(extra or {})
            json.dumps([metrics, extra], allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PublishRefusedError(f"metrics and extra must be finite JSON values: {exc}") from None

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            place = _move_or_copy_file if move else _copy_file
            known = dict(hashed or {})
            if known.keys() - set(src_files):
                raise PublishRefusedError(f"hashed files not in {src_dir}: {sorted(known.keys() - set(src_files))}")
            files = {
                rel: _move_hashed(src_dir / rel, tmp / rel, known[rel], self.digest)
                if rel in known
                else place(src_dir / rel, tmp / rel, self.digest)
                for rel in src_files
            }
            manifest = self._rename_into_place(tmp, line, parent, files, metrics, extra, sign)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if make_current:
            self._write_pointer(line, manifest.version)
        return manifest

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A new empty directory inside the store (same filesystem, never listed as a version),
        removed on exit: write a version's files there and ``publish(..., move=True)`` them, and
        their bytes are written once, by the writer, instead of written and copied."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}.staging"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def add_signature(self, version: str, signature: bytes) -> None:
        """Write ``manifest.sig`` of an unsigned version (adopting versions published before
        signing existed); atomic. ModelStoreError when the version already has one."""
        vdir = self.path(version)
        if (vdir / SIGNATURE_NAME).exists():
            raise ModelStoreError(f"{version} is already signed")
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}.sig"  # outside the version: never half-listed
        try:
            write_synced(tmp, signature)
            os.replace(tmp, vdir / SIGNATURE_NAME)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(vdir)

    def set_current(self, line: str, version: str) -> None:
        """Point ``line`` at ``version`` (e.g. to roll back); the version must exist and verify."""
        _check_line(line)
        if _parse_version(version)[0] != line:
            raise InvalidNameError(f"{version} is not a version of line {line}")
        self.verify(version)
        self._write_pointer(line, version)

    def set_pointer(self, line: str, name: str, version: str, *, verify: bool = True) -> None:
        """Point ``<line>.<name>`` at ``version`` (atomic, durable); ``current`` is ``set_current``.
        The version must exist and, unless ``verify`` is false (it was just published), verify."""
        if name == CURRENT:
            if verify:
                self.set_current(line, version)
            else:
                _check_line(line)
                self.path(version)
                self._write_pointer(line, version)
            return
        _check_line(line)
        _check_pointer(name)
        if _parse_version(version)[0] != line:
            raise InvalidNameError(f"{version} is not a version of line {line}")
        if verify:
            self.verify(version)
        else:
            self.path(version)
        self._write_line_file(line, name, {"version": version})

    # --- retention (shared/retention.py decides what goes) ---------------------------------

    def version_bytes(self, version: str) -> int:
        """Bytes of the files in ``version``'s directory (what removing it frees)."""
        return sum(p.stat().st_size for p in self.path(version).rglob("*") if p.is_file())

    def remove(self, version: str) -> int:
        """Remove a published version; returns the bytes freed. Refused (ModelStoreError) while a
        pointer of its line names it. The directory is first renamed out of the listing (a temp
        name, atomic), so a reader sees the version whole or not at all, then deleted."""
        line, _ = _parse_version(version)
        vdir = self.path(version)
        for name in sorted(POINTERS):
            if self.pointer(line, name) == version:
                raise ModelStoreError(f"refusing to remove {version}: {line}.{name} points at it")
        freed = self.version_bytes(version)
        doomed = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}.removed-{version}"
        os.rename(vdir, doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)
        return freed

    # --- internals -------------------------------------------------------------------------

    def _numbers(self, line: str) -> list[int]:
        _check_line(line)
        if not self.root.is_dir():
            return []
        numbers = []
        for entry in self.root.iterdir():
            match = _VERSION_RE.match(entry.name)
            if match and match.group(1) == line and entry.is_dir():
                numbers.append(int(match.group(2)))
        return sorted(numbers)

    def _rename_into_place(
        self,
        tmp: Path,
        line: str,
        parent: str | None,
        files: dict[str, FileDigest],
        metrics: dict[str, float],
        extra: dict[str, Any],
        sign: Callable[[str, str, bytes], bytes] | None,
    ) -> Manifest:
        """Rename ``tmp`` to the next free version name, retrying when a concurrent publisher wins a number."""
        number = max(self._numbers(line), default=0) + 1
        while True:
            version = f"{line}-{number:04d}"
            manifest = Manifest(
                version, line, parent, time.time(), files, metrics, extra,
                format=MANIFEST_FORMAT if self.digest != "sha256" else 1, digest=self.digest,
            )  # fmt: skip
            raw = manifest.to_json()
            write_synced(tmp / MANIFEST_NAME, raw)
            if sign is not None:  # signed per attempt: the version name is part of what is signed
                write_synced(tmp / SIGNATURE_NAME, sign(line, version, raw))
            fsync_tree(tmp)
            try:
                # rename(2) of a directory fails when the target is a non-empty directory, and every
                # published version holds a manifest: so a taken number is never overwritten.
                os.rename(tmp, self.root / version)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                number = max(number, *self._numbers(line)) + 1
            else:
                fsync_dir(self.root)
                return manifest

    def _pointer_path(self, line: str) -> Path:
        return self.root / f"{line}.current"

    def _write_pointer(self, line: str, version: str) -> None:
        self._write_line_file(line, "current", {"version": version})

    def read_line_record(self, line: str, name: str) -> dict[str, Any] | None:
        """The JSON record ``<line>.<name>`` beside the versions (e.g. ``policy.announced``), or None
        when there is none; ModelStoreError when it is not a JSON object."""
        _check_line(line)
        _check_record_name(name)
        try:
            doc = json.loads((self.root / f"{line}.{name}").read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ModelStoreError(f"{line}.{name} is malformed: {exc}") from None
        if not isinstance(doc, dict):
            raise ModelStoreError(f"{line}.{name} is malformed: not a JSON object")
        return doc

    def write_line_record(self, line: str, name: str, doc: dict[str, Any]) -> None:
        """Replace ``<line>.<name>`` atomically and durably (readers see the old or the new record)."""
        _check_line(line)
        _check_record_name(name)
        if name in POINTERS:
            raise InvalidNameError(f"the {name} pointer is written by publish, set_current and set_pointer only")
        self._write_line_file(line, name, doc)

    def _write_line_file(self, line: str, name: str, doc: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}.{name}"
        try:
            write_synced(tmp, json.dumps(doc, allow_nan=False).encode() + b"\n")
            os.replace(tmp, self.root / f"{line}.{name}")  # atomic: readers see the old or the new record
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.root)


def load_safetensors_state_dict(version_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files in ``version_dir`` (never unpickles anything)."""
    # Imported here so services that only list, verify or publish versions need no torch.
    from safetensors.torch import load_file

    paths = sorted(Path(version_dir).glob("*.safetensors"))
    if not paths:
        raise ModelStoreError(f"no *.safetensors file in {version_dir}")
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        tensors = load_file(path)
        duplicated = state.keys() & tensors.keys()
        if duplicated:
            raise ModelStoreError(f"{path.name} repeats tensors {sorted(duplicated)[:5]}")
        state.update(tensors)
    return state


# --- file helpers ----------------------------------------------------------------------------


def _check_line(line: str) -> None:
    if not isinstance(line, str) or not _LINE_RE.match(line):
        raise InvalidNameError(f"invalid model line {line!r}: expected lowercase letters only")


def _check_record_name(name: str) -> None:
    if not isinstance(name, str) or not _RECORD_RE.match(name):
        raise InvalidNameError(
            f"invalid line record name {name!r}: expected lowercase letters, words joined by single hyphens"
        )


def _check_pointer(name: str) -> None:
    if name not in POINTERS:
        raise InvalidNameError(f"unknown pointer {name!r}: expected one of {', '.join(sorted(POINTERS))}")


def version_number(version: str) -> int:
    """The number of a version name (``policy-0012`` -> 12); InvalidNameError for anything else."""
    return _parse_version(version)[1]


def _parse_version(version: str) -> tuple[str, int]:
    """(line, number) of a version name; rejects anything else, including path traversal."""
    match = _VERSION_RE.match(version) if isinstance(version, str) else None
    if not match:
        raise InvalidNameError(f"invalid model version {version!r}: expected <line>-<NNNN>, e.g. policy-0001")
    return match.group(1), int(match.group(2))


def _check_relative_path(rel: str) -> None:
    parts = rel.split("/")
    if rel.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"file path {rel!r} is not a plain relative path")


def _relative_files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` (recursively), as sorted POSIX relative paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _weight_format_problem(rel_paths: Collection[str]) -> str | None:
    pickled = sorted(rel for rel in rel_paths if Path(rel).suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        return f"pickle-based weight files are not allowed (use safetensors): {', '.join(pickled)}"
    if not any(rel.endswith(".safetensors") for rel in rel_paths):
        return "no *.safetensors weight file"
    return None


def _hash_file(path: Path, algorithm: str) -> FileDigest:
    return FileDigest(*file_digest(path, algorithm))


def _check_digest(version: str, rel: str, actual: FileDigest, expected: FileDigest, algorithm: str) -> None:
    if actual.bytes != expected.bytes:
        raise CorruptVersionError(f"{version}: file {rel} has {actual.bytes} bytes, manifest says {expected.bytes}")
    if actual.hex != expected.hex:
        raise CorruptVersionError(f"{version}: file {rel} does not match its {algorithm} digest in the manifest")


def _copy_file(src: Path, dst: Path, algorithm: str, *, sync: bool = True) -> FileDigest:
    """Copy ``src`` to ``dst`` (fsynced when ``sync``), hashing the bytes on the way (one read of the source)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest = new_digest(algorithm)
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(HASH_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        if sync:
            os.fsync(fout.fileno())
    return FileDigest(digest.hexdigest(), size)


def _move_hashed(src: Path, dst: Path, written: tuple[str, int], algorithm: str) -> FileDigest:
    """Rename ``src`` (written, fsynced and hashed by the caller: ``written`` = (hex, bytes)) to
    ``dst`` without reading it; copied and checked against ``written`` where it cannot simply be
    renamed (``_rename_in``)."""
    if os.stat(src).st_size != written[1]:
        raise PublishRefusedError(f"{src.name} has {os.stat(src).st_size} bytes, its writer hashed {written[1]}")
    if not _rename_in(src, dst):
        actual = _copy_file(src, dst, algorithm)
        if (actual.hex, actual.bytes) != tuple(written):
            raise PublishRefusedError(f"{src.name} does not match the digest its writer computed")
        return actual
    return FileDigest(*written)


def _rename_in(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst``; False (nothing done) where the file must be copied instead: it is
    a symlink or has other hard links (someone else could change the bytes after they were hashed),
    or the rename crosses filesystems (EXDEV)."""
    if src.is_symlink() or os.stat(src).st_nlink > 1:  # the bytes live on elsewhere: copy them
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        return False
    return True


def _move_or_copy_file(src: Path, dst: Path, algorithm: str) -> FileDigest:
    """Rename ``src`` to ``dst`` (same filesystem), then hash it with one read and fsync it;
    ``_copy_file`` where it cannot be renamed (``_rename_in``). The bytes are never written twice:
    what the writer put in the page cache is read once for the digest and flushed once."""
    if not _rename_in(src, dst):
        return _copy_file(src, dst, algorithm)
    digest = _hash_file(dst, algorithm)
    fsync_path(dst)
    return digest
