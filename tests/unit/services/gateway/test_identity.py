"""Who is asking, decided from the headers alone: API key parsing (pairs and the hashed file), the key
ring, session cookies (signed, expiring, tied to their key), and the Authenticator's rules."""

from __future__ import annotations

import hashlib
import time

import pytest

from services.gateway.identity import (
    ANONYMOUS_PREFIX,
    Authenticator,
    InvalidSession,
    KeyRing,
    KeySettingError,
    SessionCodec,
    cookie_header,
    is_secure,
    keys_file_line,
    load_keyring,
    parse_key_pairs,
    parse_keys_file,
    session_cookie,
    session_secret,
)
from shared.errors import Unauthenticated

ALICE_KEY = "alice-key-0123456789abcdefghij"
BOB_KEY = "bob-key-0123456789abcdefghijkl"


def sha(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def test_key_pairs_map_names_to_the_digests_of_their_keys():
    assert parse_key_pairs(f"alice:{ALICE_KEY}, bob:{BOB_KEY}") == [("alice", sha(ALICE_KEY)), ("bob", sha(BOB_KEY))]
    # A key may itself contain ':' (only the first one separates the name).
    assert parse_key_pairs(f"carol:{ALICE_KEY}:x") == [("carol", sha(ALICE_KEY + ":x"))]


@pytest.mark.parametrize(
    "value, message",
    [
        (",", "entry 1 is empty"),
        (f"alice:{ALICE_KEY},", "entry 2 is empty"),
        (ALICE_KEY, "entry 1 has no name"),
        (f":{ALICE_KEY}", "entry 1 has no name"),
        ("alice:short", "shorter than 24"),
        (f"al ice:{ALICE_KEY}", "not a valid name"),
        (f"-alice:{ALICE_KEY}", "not a valid name"),
        (f"alice:{ALICE_KEY}é", "printable ASCII"),
        (f"alice:{ALICE_KEY} x", "printable ASCII"),
    ],
)
def test_malformed_key_pairs_are_refused_by_what_is_wrong(value, message):
    with pytest.raises(KeySettingError, match=message) as err:
        parse_key_pairs(value)
    assert ALICE_KEY not in str(err.value), "a key must never be repeated in an error message"


def test_the_keys_file_holds_only_digests():
    text = f"# our keys\n\n{keys_file_line('alice', ALICE_KEY)}\n  bob   sha256:{sha(BOB_KEY).hex().upper()}  \n"
    assert parse_keys_file(text) == [("alice", sha(ALICE_KEY)), ("bob", sha(BOB_KEY))]
    assert ALICE_KEY not in keys_file_line("alice", ALICE_KEY)


@pytest.mark.parametrize(
    "text, message",
    [
        (f"alice {ALICE_KEY}", "line 1: expected 'name sha256:"),
        ("alice sha256:abc", "line 1: the sha256 of 'alice' is not 64 hex digits"),
        (f"\nalice:x sha256:{'0' * 64}", "line 2: 'alice:x' is not a valid name"),
        (f"alice sha256:{'0' * 64} extra", "line 1: expected"),
    ],
)
def test_malformed_keys_files_name_the_line(text, message):
    with pytest.raises(KeySettingError, match=message):
        parse_keys_file(text)


def test_load_keyring_names_the_variable_and_refuses_duplicates(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(keys_file_line("bob", BOB_KEY) + "\n")
    ring = load_keyring(f"alice:{ALICE_KEY}", keys_file)
    assert len(ring) == 2 and ring.principal(BOB_KEY.encode()) == "bob"
    with pytest.raises(ValueError, match=r"^RLHF_GATEWAY_API_KEYS: entry 1 is empty"):
        load_keyring(",", None)
    with pytest.raises(ValueError, match="RLHF_GATEWAY_API_KEYS: the name 'alice' appears twice"):
        load_keyring(f"alice:{ALICE_KEY},alice:{BOB_KEY}", None)
    with pytest.raises(ValueError, match="'bob' and 'alice' have the same key"):
        load_keyring(f"alice:{ALICE_KEY},bob:{ALICE_KEY}", None)
    with pytest.raises(ValueError, match="RLHF_GATEWAY_API_KEYS and RLHF_GATEWAY_API_KEYS_FILE: the name 'bob'"):
        load_keyring(f"bob:{ALICE_KEY}", keys_file)
    with pytest.raises(ValueError, match="RLHF_GATEWAY_API_KEYS_FILE=.*cannot read it"):
        load_keyring("", tmp_path / "missing")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="RLHF_GATEWAY_API_KEYS_FILE=.*holds no keys"):
        load_keyring("", tmp_path / "empty")
    assert not load_keyring("", None)


def test_the_key_ring_knows_exact_keys_only():
    ring = KeyRing(parse_key_pairs(f"alice:{ALICE_KEY}"))
    assert ring.principal(ALICE_KEY.encode()) == "alice"
    for wrong in (b"", ALICE_KEY[:-1].encode(), ALICE_KEY.encode() + b" ", "ключ".encode(), b"\xff\xfe"):
        assert ring.principal(wrong) is None
    assert ring.key_id_of("alice") == sha(ALICE_KEY)[:8].hex() and ring.key_id_of("bob") is None


# --- sessions ---------------------------------------------------------------------------------


def codec(ttl: int = 3600) -> SessionCodec:
    return SessionCodec(b"s" * 32, ttl)


def test_a_session_cookie_round_trips_and_expires():
    value, session = codec().issue("alice", "kid1", now=1000)
    assert session.expires_at == 4600
    assert codec().read(value, now=4600) == session
    with pytest.raises(InvalidSession, match="expired"):
        codec().read(value, now=4601)


def test_a_tampered_or_foreign_session_cookie_is_refused():
    value, _ = codec().issue("alice", "kid1")
    body, mac = value.split(".")
    other_body = codec().issue("mallory", "kid1")[0].split(".")[0]
    with pytest.raises(InvalidSession, match="signature"):
        codec().read(f"{other_body}.{mac}")
    with pytest.raises(InvalidSession, match="signature"):
        SessionCodec(b"t" * 32, 3600).read(value)  # signed with another secret
    for bad in ("", "abc", "a.b.c", "!!!.???", "x" * 600, f"{body}."):
        with pytest.raises(InvalidSession):
            codec().read(bad)


def test_a_feedback_token_is_not_a_session_even_from_the_same_secret():
    from shared.feedback_token import TokenClaims, sign

    secret = "s" * 32
    token = sign(secret, TokenClaims("resp-1", "policy-0001", "ph", int(time.time()) + 60, "alice"))
    with pytest.raises(InvalidSession):
        SessionCodec(secret.encode(), 3600).read(token)


def test_session_secret_comes_from_the_setting_else_from_the_token_secret_else_is_random():
    assert session_secret("x" * 32, "t" * 32) == (b"x" * 32, "RLHF_GATEWAY_SESSION_SECRET")
    derived, source = session_secret("", "t" * 32)
    assert derived == session_secret("", "t" * 32)[0] != b"t" * 32 and "RLHF_FEEDBACK_TOKEN_SECRET" in source
    first, source = session_secret("", "")
    assert first != session_secret("", "")[0] and "random" in source


def test_the_cookie_is_http_only_strict_and_secure_over_https():
    plain = cookie_header("v", 60, secure=False).decode()
    assert plain == "rlhf_session=v; Path=/; Max-Age=60; HttpOnly; SameSite=Strict"
    assert cookie_header("v", 60, secure=True).decode().endswith("; Secure")
    assert is_secure("https", []) and is_secure("http", [(b"x-forwarded-proto", b"https")])
    assert not is_secure("http", [(b"x-forwarded-proto", b"http")])


def test_the_session_cookie_is_found_among_others():
    assert session_cookie(b"a=1; rlhf_session=abc.def; b=2") == "abc.def"
    assert session_cookie(b"a=1") is None and session_cookie("rlhf_session=é".encode()) is None


# --- the Authenticator ------------------------------------------------------------------------------


def authenticator(anonymous: bool = False, keys: str = f"alice:{ALICE_KEY},bob:{BOB_KEY}") -> Authenticator:
    return Authenticator(KeyRing(parse_key_pairs(keys) if keys else []), codec(), anonymous)


def bearer(key: str | bytes) -> list[tuple[bytes, bytes]]:
    raw = key if isinstance(key, bytes) else key.encode()
    return [(b"authorization", b"Bearer " + raw)]


def cookie_of(set_cookie: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"cookie", set_cookie.split(b";")[0])]


def test_a_bearer_key_is_its_named_principal():
    caller = authenticator().authenticate(bearer(ALICE_KEY))
    assert (caller.principal, caller.anonymous, caller.set_cookie) == ("alice", False, None)
    assert authenticator().authenticate([(b"authorization", b"bearer  " + BOB_KEY.encode())]).principal == "bob"


@pytest.mark.parametrize("anonymous", [False, True])
@pytest.mark.parametrize(
    "header",
    [b"Bearer wrong-key-0123456789abcdefgh", b"Bearer " + "ключ".encode(), b"Bearer \xff\xfe", b"Basic abc", b""],
)
def test_a_wrong_or_non_ascii_key_is_refused_even_in_anonymous_mode(header, anonymous):
    with pytest.raises(Unauthenticated, match="invalid API key"):
        authenticator(anonymous).authenticate([(b"authorization", header)])


def test_without_a_key_or_session_the_caller_is_refused_unless_anonymous_mode_is_on():
    with pytest.raises(Unauthenticated, match="missing API key"):
        authenticator().authenticate([])
    with pytest.raises(Unauthenticated, match="missing API key"):
        authenticator().authenticate([(b"cookie", b"other=1")])
    first = authenticator(anonymous=True).authenticate([])
    second = authenticator(anonymous=True).authenticate([])
    assert first.principal.startswith(ANONYMOUS_PREFIX) and first.anonymous
    assert first.principal != second.principal, "every new anonymous caller is a principal of its own"
    assert first.set_cookie is not None and b"HttpOnly" in first.set_cookie


def test_with_no_keys_at_all_an_authorization_header_is_ignored_in_anonymous_mode():
    only_anonymous = authenticator(anonymous=True, keys="")
    caller = only_anonymous.authenticate(bearer("unused"))
    assert caller.anonymous and caller.set_cookie is not None
    assert only_anonymous.authenticate([*bearer("unused"), *cookie_of(caller.set_cookie)]).principal == caller.principal
    with pytest.raises(Unauthenticated, match="invalid API key"):
        authenticator(anonymous=False, keys="").authenticate(bearer("unused"))


def test_an_anonymous_session_keeps_its_principal_and_ends_with_anonymous_mode():
    auth = authenticator(anonymous=True)
    first = auth.authenticate([])
    assert first.set_cookie is not None
    again = auth.authenticate(cookie_of(first.set_cookie))
    assert (again.principal, again.set_cookie) == (first.principal, None)
    with pytest.raises(Unauthenticated, match="anonymous sessions are off"):
        authenticator(anonymous=False).authenticate(cookie_of(first.set_cookie))


def test_a_bad_session_is_refused_with_keys_and_replaced_in_anonymous_mode():
    forged = [(b"cookie", b"rlhf_session=" + codec().issue("alice", "kid")[0].encode()[:-3] + b"abc")]
    with pytest.raises(Unauthenticated, match="log in again"):
        authenticator().authenticate(forged)
    fresh = authenticator(anonymous=True).authenticate(forged)
    assert fresh.principal.startswith(ANONYMOUS_PREFIX) and fresh.set_cookie is not None


def test_a_login_session_is_its_keys_principal_until_the_key_changes():
    caller, session = authenticator().login(ALICE_KEY, secure=True)
    assert caller.principal == session.principal == "alice" and caller.set_cookie.endswith(b"; Secure")
    assert authenticator().authenticate(cookie_of(caller.set_cookie)).principal == "alice"
    # The key is rotated (same name, new key) or removed: the session ends with it.
    rotated = authenticator(keys=f"alice:{BOB_KEY}x")
    with pytest.raises(Unauthenticated, match="no longer valid"):
        rotated.authenticate(cookie_of(caller.set_cookie))
    # A bearer key decides alone, even beside a valid cookie.
    with pytest.raises(Unauthenticated, match="invalid API key"):
        authenticator().authenticate([*cookie_of(caller.set_cookie), *bearer("wrong")])


@pytest.mark.parametrize("key", ["wrong-key-0123456789abcdefgh", "ключ-0123456789abcdefghijklmn", ""])
def test_a_login_with_a_wrong_key_is_refused(key):
    with pytest.raises(Unauthenticated, match="invalid API key"):
        authenticator().login(key, secure=False)
