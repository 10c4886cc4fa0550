import time

import pytest

from shared.feedback_token import InvalidToken, TokenClaims, prompt_hash, sign, verify

SECRET = "s" * 32


def claims(**over) -> TokenClaims:
    base = dict(response_id="resp-1", policy_version="policy-0001", prompt_hash="ph", expires_at=int(time.time()) + 60)
    base.update(over)
    return TokenClaims(**base)


def test_roundtrip_returns_the_signed_claims():
    assert verify(SECRET, sign(SECRET, claims())) == claims()


def test_token_from_another_key_is_forged():
    with pytest.raises(InvalidToken, match="signature does not match"):
        verify(SECRET, sign("other-secret-key-xx", claims()))


def test_changing_any_claim_breaks_the_signature():
    token = sign(SECRET, claims())
    _, mac = token.split(".")
    tampered = sign(SECRET, claims(policy_version="policy-0009")).split(".")[0] + "." + mac
    with pytest.raises(InvalidToken, match="signature"):
        verify(SECRET, tampered)


def test_expired_token_is_refused():
    token = sign(SECRET, claims(expires_at=100))
    with pytest.raises(InvalidToken, match="expired"):
        verify(SECRET, token)
    assert verify(SECRET, token, now=99).expires_at == 100


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "!!!.???", "x" * 2000, None, 5])
def test_malformed_tokens_are_refused_not_crashing(token):
    with pytest.raises(InvalidToken):
        verify(SECRET, token)


def test_prompt_hash_depends_on_roles_and_contents_only():
    a = prompt_hash([("user", "hi")])
    assert a == prompt_hash([("user", "hi")])
    assert a != prompt_hash([("system", "hi")]) and a != prompt_hash([("user", "hi ")])
    assert prompt_hash([("user", "a"), ("user", "b")]) != prompt_hash([("user", "ab")])


def test_signature_is_standard_hmac_sha256_of_the_claims():
    # The keyed state is reused across tokens: it must still be plain HMAC-SHA256 with this key,
    # and a second key must not pick up the first key's state.
    import base64
    import hashlib
    import hmac

    for secret in (SECRET, "another-key-" * 8):  # the second one is longer than a SHA-256 block
        token = sign(secret, claims())
        body_part, mac_part = token.split(".")
        body = base64.urlsafe_b64decode(body_part + "=" * (-len(body_part) % 4))
        mac = base64.urlsafe_b64decode(mac_part + "=" * (-len(mac_part) % 4))
        assert mac == hmac.new(secret.encode(), body, hashlib.sha256).digest()
        assert verify(secret, token).response_id == "resp-1"


def test_the_principal_and_conversation_are_signed_claims():
    signed = claims(principal="alice", conversation_id="conv-1")
    token = sign(SECRET, signed)
    assert verify(SECRET, token) == signed
    # Another principal's name cannot be swapped in: the claims are under the MAC.
    _, mac = token.split(".")
    swapped = sign(SECRET, claims(principal="mallory", conversation_id="conv-1")).split(".")[0] + "." + mac
    with pytest.raises(InvalidToken, match="signature"):
        verify(SECRET, swapped)


def test_a_token_without_a_conversation_leaves_the_claim_out_and_reads_it_empty():
    import base64
    import json

    token = sign(SECRET, claims(principal="alice"))
    body = token.split(".")[0]
    doc = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert doc["sub"] == "alice" and "cid" not in doc
    assert verify(SECRET, token).conversation_id == ""


def test_a_token_signed_before_principals_reads_with_an_empty_principal():
    import base64
    import hashlib
    import hmac
    import json

    body = json.dumps({"rid": "resp-1", "pv": "policy-0001", "ph": "ph", "exp": int(time.time()) + 60}).encode()
    mac = hmac.new(SECRET.encode(), body, hashlib.sha256).digest()
    old = base64.urlsafe_b64encode(body).decode().rstrip("=") + "." + base64.urlsafe_b64encode(mac).decode().rstrip("=")
    assert verify(SECRET, old).principal == ""  # the feedback service refuses it for every principal


def test_signed_claims_that_are_not_an_object_are_refused_not_crashing():
    import base64
    import hashlib
    import hmac

    body = b'["rid", "pv"]'
    mac = hmac.new(SECRET.encode(), body, hashlib.sha256).digest()
    token = base64.urlsafe_b64encode(body).decode() + "." + base64.urlsafe_b64encode(mac).decode()
    with pytest.raises(InvalidToken, match="claims"):
        verify(SECRET, token.replace("=", ""))
