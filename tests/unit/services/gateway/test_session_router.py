"""/v1/session on the app create_app builds: log in once with a key, then the cookie is the caller;
log out ends it; in anonymous mode the first request opens a session of its own principal."""

from __future__ import annotations

from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.config import GatewayConfig

KEY = "alice-key-0123456789abcdefghij"
CHAT = {"model": "m", "messages": []}  # refused by validation once admitted: no inference needed


def gateway(**over) -> TestClient:
    return TestClient(create_app(GatewayConfig(**{"api_keys": f"alice:{KEY}", **over})))


def test_logging_in_with_a_key_opens_a_session_that_authenticates_later_requests():
    client = gateway()
    assert client.get("/v1/session").status_code == 401
    r = client.post("/v1/session", json={"api_key": KEY})
    assert r.status_code == 200 and r.json() == {"object": "session", "principal": "alice", "anonymous": False}
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie  # plain http here
    assert client.get("/v1/session").json()["principal"] == "alice"  # the client sends the cookie back
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 400  # admitted, then validated
    assert client.delete("/v1/session").status_code == 204
    assert client.get("/v1/session").status_code == 401, "logged out"


def test_a_session_cookie_is_secure_over_https():
    client = TestClient(create_app(GatewayConfig(api_keys=f"alice:{KEY}")), base_url="https://testserver")
    assert "; Secure" in client.post("/v1/session", json={"api_key": KEY}).headers["set-cookie"]


def test_a_wrong_key_opens_no_session():
    client = gateway()
    for body in ({"api_key": "wrong-key-0123456789abcdefgh"}, {"api_key": "ключ"}, {"api_key": ""}):
        r = client.post("/v1/session", json=body)
        assert r.status_code == 401 and r.json()["error"]["param"] == "api_key" and "set-cookie" not in r.headers
    r = client.post("/v1/session", json={"key": KEY})
    assert r.status_code == 400 and r.json()["error"]["param"] == "api_key"


def test_anonymous_mode_gives_each_new_client_its_own_principal():
    first, second = gateway(anonymous=True), gateway(anonymous=True)
    me = first.get("/v1/session").json()
    assert me["anonymous"] and me["principal"].startswith("anon:")
    assert first.get("/v1/session").json() == me, "the cookie keeps the principal"
    assert second.get("/v1/session").json()["principal"] != me["principal"]
    assert first.get("/v1/session", headers={"Authorization": f"Bearer {KEY}"}).json()["principal"] == "alice"
