"""Ed25519 signatures of model versions and their announcements (the version lines' trust root).

A publisher (the trainer for the ``policy`` line, the reward service's retraining loop and the
offline tools for ``rm``) holds a private **signing key**; every replica that follows a line holds
the line's public **verify keys** (several, for rotation). Keys are named by their ``key_id``: the
first 16 hex digits of the sha256 of the raw 32-byte public key, so a signature says which key
made it and a verifier needs no trial and error.

    key = SigningKey.load(file=Path("var/keys/policy-signing.pem"))     # or value="<base64>"
    sig = key.sign(manifest_message("policy", "policy-0003", manifest_bytes))
    keys = VerifyKeys.load(file=Path("var/keys/policy-verify.pub"))     # or values="<b64>,<b64>"
    keys.verify(manifest_message(...), sig)                             # raises SignatureError

What is signed (each message starts with its own purpose tag, so a signature of one kind can never
be presented as the other):

- a version: ``rlhf-manifest-v1 NUL line NUL version NUL <manifest.json's exact bytes>``;
- an announcement: ``rlhf-announcement-v1 NUL`` + the canonical JSON (sorted keys, no spaces) of
  line, version, manifest sha256, reason and sequence number.

Key formats: a private key is a PKCS#8 PEM file, or a base64 value of either that PEM or the raw
32-byte seed; verify keys are a file of PEM public keys and/or lines of base64 raw 32-byte keys
(``#`` comments allowed), or a comma-separated value of base64 raw keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"
MANIFEST_PURPOSE = b"rlhf-manifest-v1"
ANNOUNCEMENT_PURPOSE = b"rlhf-announcement-v1"
_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", re.DOTALL)


class SignatureError(ValueError):
    """A missing, malformed or invalid signature, or one made by a key that is not trusted."""


class KeyFormatError(ValueError):
    """A key file or value that cannot be read as an Ed25519 key; the message says why."""


@dataclass(frozen=True)
class Signature:
    """A detached signature: which key made it, and the 64 signature bytes (base64)."""

    key_id: str
    signature: str
    algorithm: str = ALGORITHM

    def to_json(self) -> bytes:
        doc = {"algorithm": self.algorithm, "key_id": self.key_id, "signature": self.signature}
        return json.dumps(doc, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Signature:
        """Parse a signature document; SignatureError when it is not one."""
        try:
            doc = json.loads(raw)
            sig = cls(key_id=str(doc["key_id"]), signature=str(doc["signature"]), algorithm=str(doc["algorithm"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SignatureError(f"malformed signature document: {exc}") from None
        if sig.algorithm != ALGORITHM:
            raise SignatureError(f"unsupported signature algorithm {sig.algorithm!r} (expected {ALGORITHM})")
        return sig


def key_id(public_raw: bytes) -> str:
    """The id of a public key: the first 16 hex digits of sha256(raw 32-byte public key)."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --- messages ------------------------------------------------------------------------------------


def manifest_message(line: str, version: str, manifest_bytes: bytes) -> bytes:
    """What a version's signature covers: purpose, line, version and the manifest's exact bytes
    (NUL-separated; line and version names cannot contain NUL)."""
    return b"\0".join([MANIFEST_PURPOSE, line.encode(), version.encode(), manifest_bytes])


def announcement_message(line: str, version: str, manifest_sha256: str, reason: str, sequence: int) -> bytes:
    """What an announcement's signature covers: purpose + canonical JSON of its five fields."""
    doc = {
        "line": line,
        "version": version,
        "manifest_sha256": manifest_sha256,
        "reason": reason,
        "sequence": int(sequence),
    }
    return ANNOUNCEMENT_PURPOSE + b"\0" + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# --- keys ----------------------------------------------------------------------------------------


class SigningKey:
    """A publisher's private Ed25519 key."""

    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public_raw = _raw_public(private.public_key())
        self.key_id = key_id(self.public_raw)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> SigningKey:
        """A key from PEM bytes, or from base64 of the PEM or of the raw 32-byte seed."""
        text = data.strip()
        if not text.startswith(b"-----BEGIN"):
            try:
                decoded = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise KeyFormatError(f"{where}: neither a PEM private key nor base64") from None
            if len(decoded) == 32:
                return cls(Ed25519PrivateKey.from_private_bytes(decoded))
            text = decoded.strip()
        try:
            private = serialization.load_pem_private_key(text, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFormatError(f"{where}: not a readable unencrypted PEM private key ({exc})") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyFormatError(f"{where}: a {type(private).__name__}, not an Ed25519 private key")
        return cls(private)

    @classmethod
    def load(cls, *, file: Path | None = None, value: str = "") -> SigningKey | None:
        """The key in ``file`` (PEM) or ``value`` (base64), None when neither is given."""
        if file is not None and value:
            raise KeyFormatError("give the signing key as a file or as a value, not both")
        if file is not None:
            try:
                data = Path(file).read_bytes()
            except OSError as exc:
                raise KeyFormatError(f"{file}: cannot read the signing key: {exc.strerror or exc}") from None
            return cls.from_bytes(data, str(file))
        if value:
            return cls.from_bytes(value.encode(), "the signing key value")
        return None

    def sign(self, message: bytes) -> Signature:
        return Signature(self.key_id, base64.b64encode(self._private.sign(message)).decode())

    def verify_keys(self) -> VerifyKeys:
        """The public half, as a verifier trusting only this key."""
        return VerifyKeys({self.key_id: Ed25519PublicKey.from_public_bytes(self.public_raw)})

    def private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_pem(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class VerifyKeys:
    """The public keys a follower trusts for one line, by key id."""

    def __init__(self, keys: dict[str, Ed25519PublicKey]):
        if not keys:
            raise KeyFormatError("no verify key")
        self.keys = dict(keys)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self.keys)

    @classmethod
    def parse(cls, data: bytes, where: str) -> VerifyKeys:
        """PEM public key blocks and/or lines of base64 raw keys (``#`` starts a comment)."""
        keys: dict[str, Ed25519PublicKey] = {}
        for block in _PEM_BLOCK.findall(data):
            try:
                public = serialization.load_pem_public_key(block)
            except ValueError as exc:
                raise KeyFormatError(f"{where}: unreadable PEM public key ({exc})") from None
            if not isinstance(public, Ed25519PublicKey):
                raise KeyFormatError(f"{where}: a {type(public).__name__}, not an Ed25519 public key")
            keys[key_id(_raw_public(public))] = public
        rest = _PEM_BLOCK.sub(b"", data)
        for n, raw_line in enumerate(rest.replace(b",", b"\n").splitlines(), 1):
            text = raw_line.split(b"#", 1)[0].strip()
            if not text:
                continue
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise KeyFormatError(f"{where}: entry {n} is neither a PEM public key nor base64") from None
            if len(raw) != 32:
                raise KeyFormatError(f"{where}: entry {n} is {len(raw)} bytes; an Ed25519 public key is 32")
            keys[key_id(raw)] = Ed25519PublicKey.from_public_bytes(raw)
        if not keys:
            raise KeyFormatError(f"{where}: no verify key in it")
        return cls(keys)

    @classmethod
    def load(cls, *, file: Path | None = None, values: str = "") -> VerifyKeys | None:
        """The keys in ``file`` and/or ``values`` (comma-separated base64); None when neither is given."""
        keys: dict[str, Ed25519PublicKey] = {}
        if file is not None:
            try:
                data = Path(file).read_bytes()
            except OSError as exc:
                raise KeyFormatError(f"{file}: cannot read the verify keys: {exc.strerror or exc}") from None
            keys.update(cls.parse(data, str(file)).keys)
        if values.strip():
            keys.update(cls.parse(values.encode(), "the verify key value").keys)
        return cls(keys) if keys else None

    def verify(self, message: bytes, signature: Signature | None) -> None:
        """Raise SignatureError unless ``signature`` is a valid signature of ``message`` by a trusted key."""
        if signature is None or not signature.signature:
            raise SignatureError("unsigned")
        if signature.algorithm != ALGORITHM:
            raise SignatureError(f"unsupported signature algorithm {signature.algorithm!r}")
        public = self.keys.get(signature.key_id)
        if public is None:
            raise SignatureError(f"signed by key {signature.key_id or '(none)'!s}, which is not trusted")
        try:
            raw = base64.b64decode(signature.signature, validate=True)
            public.verify(raw, message)
        except (binascii.Error, ValueError, InvalidSignature):
            raise SignatureError(f"invalid signature by key {signature.key_id}") from None


def write_key_pair(private_path: Path, public_path: Path) -> SigningKey:
    """Generate a key pair: the private key as PEM (mode 0600, never overwritten) and the public
    key as PEM. Returns the key; FileExistsError when ``private_path`` exists."""
    key = SigningKey.generate()
    private_path = Path(private_path)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_pem())
    Path(public_path).write_bytes(key.public_pem())
    return key


def ensure_key_pair(private_path: Path, public_path: Path) -> SigningKey:
    """The key pair at these paths, generated on first use (``rlhf up``); the public file is
    rewritten from the private key when missing."""
    if Path(private_path).exists():
        key = SigningKey.load(file=Path(private_path))
        assert key is not None
        if not Path(public_path).exists():
            Path(public_path).write_bytes(key.public_pem())
        return key
    return write_key_pair(private_path, public_path)
