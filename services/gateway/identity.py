"""Who is asking: API keys mapped to named principals, signed session cookies, anonymous sessions.

Every /v1/ request is served for a principal the gateway itself established, never one the client
names:

- ``Authorization: Bearer <key>``: the key's name (``KeyRing``: keys from RLHF_GATEWAY_API_KEYS as
  ``name:key`` pairs and from RLHF_GATEWAY_API_KEYS_FILE as ``name sha256:<hex>`` lines, held as
  SHA-256 digests only);
- the ``rlhf_session`` cookie (``SessionCodec``: HMAC-SHA256 over principal, key id and expiry),
  set by ``POST /v1/session`` for a key (the chat page's login), or at once in anonymous mode;
- in anonymous mode, a request with neither gets a fresh principal ``anon:<random>`` and the cookie
  that keeps it (with no keys configured at all, an Authorization header is ignored: there is no
  key to check it against).

Anything else is refused (401): a wrong, malformed or non-ASCII key, a forged or expired cookie
without anonymous mode. ``Authenticator.authenticate`` is the one place that decides.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.gateway import metrics
from shared.errors import Unauthenticated

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A key's name (the principal): letters, digits, ``.``, ``_``, ``-``; no ``:``, so that no key can
be named like an anonymous principal."""
MIN_KEY_CHARS = 24
"""Shortest API key accepted (``secrets.token_urlsafe(24)`` gives 32 characters)."""
KEY_PATTERN = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
"""A key: printable ASCII without spaces or commas (they separate the pairs)."""
ANONYMOUS_PREFIX = "anon:"
SESSION_COOKIE = "rlhf_session"
_ANONYMOUS_KID = "-"


class KeySettingError(ValueError):
    """A malformed API key setting; the message says what is wrong, without the key itself."""


def key_digest(key: bytes) -> bytes:
    """SHA-256 of an API key: what the gateway keeps and compares, never the key."""
    return hashlib.sha256(key).digest()


def key_id(digest: bytes) -> str:
    """A short public id of a key (the first 8 bytes of its digest, hex): sessions carry it, so a
    session dies when its key is rotated or removed."""
    return digest[:8].hex()


def parse_key_pairs(value: str) -> list[tuple[str, bytes]]:
    """``name:key,name:key`` -> [(name, sha256(key))]. Raises KeySettingError for an empty entry, a key
    without a name, a bad name, or a short or malformed key (messages never repeat the key)."""
    out = []
    for n, entry in enumerate(value.split(","), 1):
        entry = entry.strip()
        if not entry:
            raise KeySettingError(f"entry {n} is empty (expected name:key pairs separated by commas)")
        name, sep, key = entry.partition(":")
        if not sep or not name:
            raise KeySettingError(f"entry {n} has no name (expected name:key)")
        _check_name(name, f"entry {n}")
        if len(key) < MIN_KEY_CHARS:
            raise KeySettingError(f"the key of {name!r} is shorter than {MIN_KEY_CHARS} characters")
        if not KEY_PATTERN.fullmatch(key):
            raise KeySettingError(f"the key of {name!r} has characters other than printable ASCII")
        out.append((name, key_digest(key.encode("ascii"))))
    return out


def parse_keys_file(text: str) -> list[tuple[str, bytes]]:
    """Lines ``name sha256:<64 hex digits>`` (blank lines and ``#`` comments skipped) ->
    [(name, digest)]. Raises KeySettingError naming the line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("sha256:"):
            raise KeySettingError(f"line {n}: expected 'name sha256:<hex of the key>'")
        name, hexdigest = parts[0], parts[1].removeprefix("sha256:")
        _check_name(name, f"line {n}")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigest):
            raise KeySettingError(f"line {n}: the sha256 of {name!r} is not 64 hex digits")
        out.append((name, bytes.fromhex(hexdigest)))
    return out


def _check_name(name: str, where: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise KeySettingError(
            f"{where}: {name[:70]!r} is not a valid name (1-64 letters, digits, '.', '_', '-', "
            "starting with a letter or digit)"
        )


class KeyRing:
    """Named principals by the SHA-256 of their keys: a key check is one hash and one dict lookup,
    whatever the number of keys, and the stored digest is then compared in constant time."""

    def __init__(self, entries: Iterable[tuple[str, bytes]] = ()):
        self._by_digest: dict[bytes, str] = {}
        self._by_name: dict[str, bytes] = {}
        for name, digest in entries:
            if name in self._by_name:
                raise KeySettingError(f"the name {name!r} appears twice")
            if digest in self._by_digest:
                raise KeySettingError(f"{name!r} and {self._by_digest[digest]!r} have the same key")
            self._by_digest[digest] = name
            self._by_name[name] = digest

    def __len__(self) -> int:
        return len(self._by_name)

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def principal(self, key: bytes) -> str | None:
        """The name of ``key``, or None for an unknown key."""
        digest = key_digest(key)
        name = self._by_digest.get(digest)
        if name is None or not hmac.compare_digest(self._by_name[name], digest):
            return None
        return name

    def key_id_of(self, name: str) -> str | None:
        """The key id of a name's current key, None when the name has no key (any more)."""
        digest = self._by_name.get(name)
        return key_id(digest) if digest is not None else None


def load_keyring(api_keys: str, api_keys_file: Path | None) -> KeyRing:
    """The keys of both settings; raises ValueError naming the variable at fault."""
    entries: list[tuple[str, bytes]] = []
    if api_keys:
        try:
            entries += parse_key_pairs(api_keys)
        except KeySettingError as exc:
            raise ValueError(f"RLHF_GATEWAY_API_KEYS: {exc}") from None
    if api_keys_file is not None:
        try:
            text = Path(api_keys_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"RLHF_GATEWAY_API_KEYS_FILE={api_keys_file}: cannot read it ({exc})") from None
        try:
            from_file = parse_keys_file(text)
        except KeySettingError as exc:
            raise ValueError(f"RLHF_GATEWAY_API_KEYS_FILE={api_keys_file}: {exc}") from None
        if not from_file:
            raise ValueError(f"RLHF_GATEWAY_API_KEYS_FILE={api_keys_file}: holds no keys")
        entries += from_file
    try:
        return KeyRing(entries)
    except KeySettingError as exc:
        both = "RLHF_GATEWAY_API_KEYS and RLHF_GATEWAY_API_KEYS_FILE" if api_keys and api_keys_file else None
        var = both or ("RLHF_GATEWAY_API_KEYS" if api_keys else "RLHF_GATEWAY_API_KEYS_FILE")
        raise ValueError(f"{var}: {exc}") from None


def keys_file_line(name: str, key: str) -> str:
    """The RLHF_GATEWAY_API_KEYS_FILE line for a key (what `rlhf up` and the benchmark write)."""
    return f"{name} sha256:{key_digest(key.encode('ascii')).hex()}"


# --- sessions ------------------------------------------------------------------------------------


class InvalidSession(ValueError):
    """A session cookie that is malformed, forged or expired; the message says which."""


@dataclass(frozen=True, slots=True)
class Session:
    principal: str
    key_id: str
    """The key the session was opened with (``key_id``), or "-" for an anonymous session."""
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionCodec:
    """Session cookies: ``base64url(JSON {sub, kid, exp}) + "." + base64url(HMAC-SHA256(key, JSON))``.

    The HMAC key is derived from the configured secret with a label of its own, so that a cookie is
    never also a valid feedback token or the other way round, even when both come from one secret.
    """

    def __init__(self, secret: bytes, ttl_s: int):
        self._key = hmac.new(secret, b"rlhf-gateway-session-v1", hashlib.sha256).digest()
        self.ttl_s = ttl_s

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()

    def issue(self, principal: str, kid: str, now: float | None = None) -> tuple[str, Session]:
        """A cookie value for ``principal``, valid for ttl_s from ``now``."""
        session = Session(principal, kid, int(time.time() if now is None else now) + self.ttl_s)
        body = json.dumps(
            {"sub": session.principal, "kid": session.key_id, "exp": session.expires_at}, separators=(",", ":")
        ).encode()
        return f"{_b64(body)}.{_b64(self._mac(body))}", session

    def read(self, value: str, now: float | None = None) -> Session:
        """The session of a valid cookie; raises InvalidSession for anything else."""
        if value.count(".") != 1 or len(value) > 512:
            raise InvalidSession("malformed session cookie")
        body_part, mac_part = value.split(".")
        try:
            body, mac = _unb64(body_part), _unb64(mac_part)
        except (ValueError, binascii.Error):
            raise InvalidSession("malformed session cookie") from None
        if not hmac.compare_digest(mac, self._mac(body)):
            raise InvalidSession("session cookie signature does not match")
        try:
            doc = json.loads(body)
            session = Session(str(doc["sub"]), str(doc["kid"]), int(doc["exp"]))
        except (ValueError, KeyError, TypeError):
            raise InvalidSession("malformed session cookie") from None
        if session.expires_at < (time.time() if now is None else now):
            raise InvalidSession("session expired")
        return session


def session_secret(configured: str, token_secret: str) -> tuple[bytes, str]:
    """The secret sessions are signed with, and where it came from.

    RLHF_GATEWAY_SESSION_SECRET when set; else derived from RLHF_FEEDBACK_TOKEN_SECRET (shared by
    every gateway replica already, so a session opened on one is valid on all; the derivation's
    label keeps the two uses apart); else a random secret for this process only (sessions then end
    when it restarts and are not shared between replicas).
    """
    if configured:
        return configured.encode(), "RLHF_GATEWAY_SESSION_SECRET"
    if token_secret:
        return hmac.new(token_secret.encode(), b"rlhf-gateway-session-secret", hashlib.sha256).digest(), (
            "derived from RLHF_FEEDBACK_TOKEN_SECRET"
        )
    return secrets.token_bytes(32), "random, this process only"


def cookie_header(value: str, max_age: int, secure: bool) -> bytes:
    """The Set-Cookie header value of a session cookie: HttpOnly (no script reads it), SameSite=Strict
    (no other site's page sends it), Secure when the request came over https."""
    attributes = f"{SESSION_COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"
    return (attributes + ("; Secure" if secure else "")).encode("latin-1")


# --- authenticating a request ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request is served for."""

    principal: str
    anonymous: bool
    set_cookie: bytes | None = None
    """A Set-Cookie header value to send with the response (a new anonymous session), or None."""


class Authenticator:
    """Decides who a request comes from, from its headers only (see the module docstring)."""

    def __init__(self, keys: KeyRing, sessions: SessionCodec, anonymous: bool):
        self.keys = keys
        self.sessions = sessions
        self.anonymous = anonymous
        self._counted = {
            result: metrics.AUTH.labels(result)
            for result in ("key", "session", "new_anonymous", "missing", "invalid_key", "invalid_session")
        }

    def authenticate(self, headers: Sequence[tuple[bytes, bytes]], scheme: str = "http") -> Caller:
        """The caller of a request with these (lower-case) headers, that came over ``scheme``;
        raises Unauthenticated.

        A bearer key decides alone (a wrong one is refused even beside a valid cookie); without one,
        a valid session cookie; without either, a new anonymous session in anonymous mode. With no
        keys configured at all (anonymous mode only) there is no key to check: an Authorization
        header is ignored, so that clients that always send one (the openai package) still get, and
        keep by cookie, an anonymous principal.
        """
        authorization = cookie = None
        for name, value in headers:
            if name == b"authorization":
                authorization = value
            elif name == b"cookie":
                cookie = value
        if authorization is not None and (self.keys or not self.anonymous):
            return self._by_key(authorization)
        if cookie is not None:
            session = session_cookie(cookie)
            if session is not None:
                try:
                    caller = self.by_session(session)
                except InvalidSession as exc:
                    if not self.anonymous:
                        self._counted["invalid_session"].inc()
                        raise Unauthenticated(f"{exc}: log in again (POST /v1/session)") from None
                else:
                    self._counted["session"].inc()
                    return caller
        if self.anonymous:
            self._counted["new_anonymous"].inc()
            return self.new_anonymous(is_secure(scheme, headers))
        self._counted["missing"].inc()
        raise Unauthenticated("missing API key (Authorization: Bearer ...) or session (POST /v1/session)")

    def _by_key(self, header: bytes) -> Caller:
        scheme, _, key = header.partition(b" ")
        principal = self.keys.principal(key.strip()) if scheme.lower() == b"bearer" else None
        if principal is None:
            self._counted["invalid_key"].inc()
            raise Unauthenticated("invalid API key (Authorization: Bearer ...)")
        self._counted["key"].inc()
        return Caller(principal, anonymous=False)

    def by_session(self, value: str) -> Caller:
        """The caller of a session cookie's value; raises InvalidSession. A key's session ends with
        the key (rotated or removed); an anonymous one when anonymous mode is turned off."""
        session = self.sessions.read(value)
        if session.key_id == _ANONYMOUS_KID:
            if not self.anonymous or not session.principal.startswith(ANONYMOUS_PREFIX):
                raise InvalidSession("anonymous sessions are off")
            return Caller(session.principal, anonymous=True)
        if self.keys.key_id_of(session.principal) != session.key_id:
            raise InvalidSession("the session's API key is no longer valid")
        return Caller(session.principal, anonymous=False)

    def new_anonymous(self, secure: bool) -> Caller:
        value, session = self.sessions.issue(ANONYMOUS_PREFIX + secrets.token_hex(8), _ANONYMOUS_KID)
        return Caller(session.principal, anonymous=True, set_cookie=cookie_header(value, self.sessions.ttl_s, secure))

    def login(self, key: str, secure: bool) -> tuple[Caller, Session]:
        """A session for an API key (POST /v1/session); raises Unauthenticated for a wrong key."""
        try:
            raw = key.encode("ascii")
        except UnicodeEncodeError:
            raw = b""
        principal = self.keys.principal(raw) if raw else None
        kid = self.keys.key_id_of(principal) if principal else None
        if principal is None or kid is None:
            self._counted["invalid_key"].inc()
            raise Unauthenticated("invalid API key")
        value, session = self.sessions.issue(principal, kid)
        return Caller(principal, False, cookie_header(value, self.sessions.ttl_s, secure)), session


def session_cookie(header: bytes) -> str | None:
    """The value of the session cookie in a Cookie header, or None."""
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return None
    for part in text.split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE:
            return value
    return None


def is_secure(scope_scheme: str, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the client reached us over https: directly, or through a proxy that says so
    (X-Forwarded-Proto). A client faking the header only gets a stricter (Secure) cookie."""
    if scope_scheme == "https":
        return True
    return any(name == b"x-forwarded-proto" and value.strip().lower() == b"https" for name, value in headers)
