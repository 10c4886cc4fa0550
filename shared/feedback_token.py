"""Signed feedback tokens: proof that a response was served, and to whom, so that nobody rates an
answer the service never gave, nobody rates an answer served to someone else, and the rated
response's policy_version comes from the server, not the client.

A token is ``base64url(claims JSON) + "." + base64url(HMAC-SHA256(secret, claims JSON))`` with the
claims ``rid`` (response_id), ``pv`` (policy_version), ``ph`` (hash of the prompt's messages),
``exp`` (expiry, unix seconds), ``sub`` (the principal the response was served to, as the gateway
authenticated it) and, when the request named one, ``cid`` (its conversation id). The gateway signs
one per served completion; the feedback service verifies it and refuses a rating by any principal
other than ``sub``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

import orjson


class InvalidToken(ValueError):
    """A token that is malformed, forged, or expired; the message says which."""


@dataclass(frozen=True)
class TokenClaims:
    response_id: str
    policy_version: str
    prompt_hash: str
    expires_at: int
    principal: str = ""
    """Who the response was served to (claim ``sub``); empty only in tokens from before principals
    were bound, which the feedback service refuses."""
    conversation_id: str = ""
    """The conversation the request named (claim ``cid``), empty when it named none."""


def prompt_hash(messages: Iterable[tuple[str, str]]) -> str:
    """A stable hash of a conversation given as (role, content) pairs: same prompt, same hash."""
    canonical = json.dumps([[role, content] for role, content in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    # binascii directly: base64.urlsafe_b64decode does the same in Python, at twice the cost.
    return binascii.a2b_base64(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4))


@functools.lru_cache(maxsize=4)
def _keyed_mac(secret: str) -> hmac.HMAC:
    """An HMAC-SHA256 state with the key already absorbed; ``.copy()`` per token skips the key
    set-up, which was most of a token check's cost (verify runs for every rating)."""
    return hmac.new(secret.encode(), digestmod=hashlib.sha256)


def _mac(secret: str, body: bytes) -> bytes:
    mac = _keyed_mac(secret).copy()
    mac.update(body)
    return mac.digest()


def sign(secret: str, claims: TokenClaims) -> str:
    doc: dict[str, str | int] = {
        "rid": claims.response_id,
        "pv": claims.policy_version,
        "ph": claims.prompt_hash,
        "exp": claims.expires_at,
        "sub": claims.principal,
    }
    if claims.conversation_id:
        doc["cid"] = claims.conversation_id
    body = json.dumps(doc, separators=(",", ":")).encode()
    return f"{_b64(body)}.{_b64(_mac(secret, body))}"


def verify(secret: str, token: str, now: float | None = None) -> TokenClaims:
    """The claims of a valid token; raises InvalidToken for anything else."""
    if not isinstance(token, str) or token.count(".") != 1 or len(token) > 1024:
        raise InvalidToken("malformed feedback token")
    body_part, mac_part = token.split(".")
    try:
        body, mac = _unb64(body_part), _unb64(mac_part)
    except (ValueError, TypeError):  # binascii.Error is a ValueError
        raise InvalidToken("malformed feedback token") from None
    if not hmac.compare_digest(mac, _mac(secret, body)):
        raise InvalidToken("feedback token signature does not match (forged or from another server)")
    try:
        doc = orjson.loads(body)  # orjson.JSONDecodeError is a ValueError
        claims = TokenClaims(
            str(doc["rid"]),
            str(doc["pv"]),
            str(doc["ph"]),
            int(doc["exp"]),
            str(doc.get("sub", "")),
            str(doc.get("cid", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidToken("malformed feedback token claims") from None
    if claims.expires_at < (time.time() if now is None else now):
        raise InvalidToken(f"feedback token for {claims.response_id} has expired")
    return claims
