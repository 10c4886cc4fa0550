"""Ed25519 keys, signatures and the signed messages of versions and announcements."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from shared.signing import (
    KeyFormatError,
    Signature,
    SignatureError,
    SigningKey,
    VerifyKeys,
    announcement_message,
    ensure_key_pair,
    key_id,
    manifest_message,
    write_key_pair,
)


def test_a_signature_verifies_under_the_public_key_and_names_it():
    key = SigningKey.generate()
    sig = key.sign(b"message")
    assert sig.key_id == key.key_id == key_id(key.public_raw) and len(sig.key_id) == 16
    key.verify_keys().verify(b"message", sig)


def test_an_altered_message_another_key_or_no_signature_is_refused():
    key, other = SigningKey.generate(), SigningKey.generate()
    keys = key.verify_keys()
    sig = key.sign(b"message")
    with pytest.raises(SignatureError, match="invalid signature"):
        keys.verify(b"messagE", sig)
    with pytest.raises(SignatureError, match="not trusted"):
        keys.verify(b"message", other.sign(b"message"))
    # Another key's signature presented under the trusted key's id: still invalid.
    with pytest.raises(SignatureError, match="invalid signature"):
        keys.verify(b"message", Signature(key.key_id, other.sign(b"message").signature))
    with pytest.raises(SignatureError, match="unsigned"):
        keys.verify(b"message", None)
    with pytest.raises(SignatureError, match="invalid signature"):
        keys.verify(b"message", Signature(key.key_id, "not base64!"))
    with pytest.raises(SignatureError, match="algorithm"):
        keys.verify(b"message", Signature(key.key_id, sig.signature, algorithm="rsa"))


def test_signature_documents_round_trip_and_malformed_ones_are_refused():
    sig = SigningKey.generate().sign(b"m")
    assert Signature.from_json(sig.to_json()) == sig
    for raw in (b"", b"[]", b'{"key_id": "x"}', b'{"key_id": "x", "signature": "y", "algorithm": "rsa"}'):
        with pytest.raises(SignatureError):
            Signature.from_json(raw)


def test_the_messages_are_domain_separated_and_cover_every_field():
    m = manifest_message("policy", "policy-0001", b"{}")
    assert m.startswith(b"rlhf-manifest-v1\0policy\0policy-0001\0") and m.endswith(b"{}")
    a = announcement_message("policy", "policy-0001", "ab", "publish", 3)
    assert a.startswith(b"rlhf-announcement-v1\0") and a != m
    variants = [
        announcement_message("rm", "policy-0001", "ab", "publish", 3),
        announcement_message("policy", "policy-0002", "ab", "publish", 3),
        announcement_message("policy", "policy-0001", "ac", "publish", 3),
        announcement_message("policy", "policy-0001", "ab", "rollback", 3),
        announcement_message("policy", "policy-0001", "ab", "publish", 4),
    ]
    assert len({a, *variants}) == 6


def test_private_keys_load_from_pem_files_and_base64_values(tmp_path: Path):
    key = write_key_pair(tmp_path / "k.pem", tmp_path / "k.pub")
    assert stat.S_IMODE(os.stat(tmp_path / "k.pem").st_mode) == 0o600
    from_file = SigningKey.load(file=tmp_path / "k.pem")
    from_pem_b64 = SigningKey.load(value=base64.b64encode(key.private_pem()).decode())
    assert from_file is not None and from_pem_b64 is not None
    assert from_file.key_id == from_pem_b64.key_id == key.key_id
    seed = key._private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    from_seed = SigningKey.load(value=base64.b64encode(seed).decode())
    assert from_seed is not None and from_seed.key_id == key.key_id
    assert SigningKey.load() is None
    public = VerifyKeys.load(file=tmp_path / "k.pub")
    assert public is not None and public.key_ids == [key.key_id]


def test_bad_private_keys_are_refused_with_the_reason(tmp_path: Path):
    with pytest.raises(KeyFormatError, match="cannot read"):
        SigningKey.load(file=tmp_path / "missing.pem")
    with pytest.raises(KeyFormatError, match="neither a PEM private key nor base64"):
        SigningKey.load(value="not a key")
    ec = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ec.pem").write_bytes(ec)
    with pytest.raises(KeyFormatError, match="not an Ed25519 private key"):
        SigningKey.load(file=tmp_path / "ec.pem")
    with pytest.raises(KeyFormatError, match="not both"):
        SigningKey.load(file=tmp_path / "ec.pem", value="x")


def test_verify_keys_take_pem_blocks_base64_lines_comments_and_values(tmp_path: Path):
    a, b, c = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    text = a.public_pem() + b"# the rotated-in key\n" + base64.b64encode(b.public_raw) + b"  # b\n\n"
    (tmp_path / "keys").write_bytes(text)
    keys = VerifyKeys.load(file=tmp_path / "keys", values=base64.b64encode(c.public_raw).decode())
    assert keys is not None and keys.key_ids == sorted([a.key_id, b.key_id, c.key_id])
    for k in (a, b, c):
        keys.verify(b"x", k.sign(b"x"))
    assert VerifyKeys.load() is None


def test_bad_verify_keys_are_refused_with_the_reason(tmp_path: Path):
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(KeyFormatError, match="no verify key"):
        VerifyKeys.load(file=tmp_path / "empty")
    with pytest.raises(KeyFormatError, match="32"):
        VerifyKeys.load(values=base64.b64encode(b"short").decode())
    with pytest.raises(KeyFormatError, match="entry 1"):
        VerifyKeys.load(values="???")
    with pytest.raises(KeyFormatError, match="cannot read"):
        VerifyKeys.load(file=tmp_path / "missing")


def test_ensure_key_pair_generates_once_and_keeps_the_key(tmp_path: Path):
    first = ensure_key_pair(tmp_path / "keys" / "p.pem", tmp_path / "keys" / "p.pub")
    (tmp_path / "keys" / "p.pub").unlink()
    again = ensure_key_pair(tmp_path / "keys" / "p.pem", tmp_path / "keys" / "p.pub")
    assert again.key_id == first.key_id
    public = VerifyKeys.load(file=tmp_path / "keys" / "p.pub")
    assert public is not None and public.key_ids == [first.key_id]
    with pytest.raises(FileExistsError):
        write_key_pair(tmp_path / "keys" / "p.pem", tmp_path / "keys" / "other.pub")
