"""The attacks of the security review (issue 13), each sent to a real Herald process.

Each test is the attack as it was found; it failed on the code before the fix. Numbers refer to
the findings of the review, as recorded in docs/security.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.herald.hardening.conftest import JWT_SECRET, bearer
from tests.support.server import ROOT, HeraldServer, free_port

pytestmark = pytest.mark.e2e

SEND = "/chats/lobby/messages"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _token(key: object, algorithm: str, subject: str = "alice") -> str:
    now = int(time.time())
    return jwt.encode({"sub": subject, "iat": now, "exp": now + 300}, key, algorithm=algorithm)  # type: ignore[arg-type]


def test_2_idempotency_keys_of_two_subjects_never_meet(herald: Callable[..., HeraldServer]) -> None:
    server = herald({"HERALD_JWT_SECRET": JWT_SECRET, "HERALD_EMBEDDED_WORKER": "0"})
    with httpx.Client(base_url=server.url, timeout=5) as client:
        first = client.post(SEND, json={"author": "a", "text": "secret"},
                            headers={**bearer("urn:user:1"), "Idempotency-Key": "k1"})
        assert first.status_code == 202
        # "urn:user" + "1:k1" was the same scope as "urn:user:1" + "k1" when joined with ':'
        second = client.post(SEND, json={"author": "a", "text": "secret"},
                             headers={**bearer("urn:user"), "Idempotency-Key": "1:k1"})
        assert second.status_code == 202
        assert second.json()["id"] != first.json()["id"]
        assert "idempotent-replayed" not in second.headers


def test_2_an_anonymous_key_conflict_names_no_operation(herald: Callable[..., HeraldServer]) -> None:
    server = herald({"HERALD_EMBEDDED_WORKER": "0"})
    with httpx.Client(base_url=server.url, timeout=5) as client:
        first = client.post(SEND, json={"author": "a", "text": "one"}, headers={"Idempotency-Key": "readme-key"})
        other = client.post(SEND, json={"author": "b", "text": "two"}, headers={"Idempotency-Key": "readme-key"})
        assert other.status_code == 422
        assert first.json()["id"] not in other.text


def _forged_hs256(secret: str) -> str:
    """An HS256 token whose HMAC key is ``secret`` (the public key's PEM: the classic key-confusion attack)."""
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    head = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    body = b64(orjson.dumps({"sub": "alice", "exp": int(time.time()) + 300}))
    signature = b64(hmac.new(secret.encode(), head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + signature).decode()


@pytest.mark.parametrize("signer", ["ec-against-rsa", "rsa-against-ec", "hs256-with-the-public-key"])
def test_6_a_token_of_another_key_family_is_401_not_500(herald: Callable[..., HeraldServer], signer: str) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    configured, token = {
        "ec-against-rsa": (rsa_key, _token(ec_key, "ES256")),
        "rsa-against-ec": (ec_key, _token(rsa_key, "RS256")),
        "hs256-with-the-public-key": (rsa_key, _forged_hs256(_pem(rsa_key))),
    }[signer]
    server = herald({"HERALD_JWT_PUBLIC_KEY": _pem(configured)})
    with httpx.Client(base_url=server.url, timeout=5) as client:
        response = client.post(SEND, json={"author": "a", "text": "b"}, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, response.text
        assert response.headers["content-type"] == "application/problem+json"
        good = client.post(SEND, json={"author": "a", "text": "b"},
                           headers={"Authorization": f"Bearer {_token(configured, _family(configured))}"})
        assert good.status_code == 202
    assert "Traceback" not in server.log()


def _family(key: object) -> str:
    return "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"


@pytest.mark.parametrize("wait", ["²", "³", "1¹"])  # headers arrive as latin-1: these are what isdigit() took
def test_7_a_wait_of_non_ascii_digits_is_ignored_not_a_500(herald: Callable[..., HeraldServer], wait: str) -> None:
    server = herald()
    with httpx.Client(base_url=server.url, timeout=5) as client:
        response = client.post(SEND, json={"author": "a", "text": "b"},
                               headers={"Prefer": f"wait={wait}".encode("latin-1")})
        assert response.status_code in (200, 202), response.text
        assert "preference-applied" not in response.headers


def test_8_a_forged_host_never_reaches_the_websocket_url(herald: Callable[..., HeraldServer]) -> None:
    server = herald()
    with httpx.Client(base_url=server.url, timeout=5) as client:
        posted = client.post(SEND, json={"author": "a", "text": "b"},
                             headers={"Host": "evil.example", "X-Forwarded-Proto": "https"})
        room = client.get("/chats/lobby", headers={"Host": "evil.example"})
        trusted = client.get("/chats/lobby")
    for url in (posted.json()["websocket_url"], room.json()["websocket_url"]):
        assert "evil.example" not in url
        assert url.startswith("/ws?")
    assert trusted.json()["websocket_url"].startswith(f"ws://127.0.0.1:{server.port}/ws?")


def _start_fails(env: dict[str, str]) -> str:
    """Run ``herald serve`` with ``env``; it must exit non-zero at once. Its output."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_") and k != "REDIS_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "herald", "serve", "--app", "app.main:create_app", "--port", str(free_port())],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode != 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_9_cors_star_with_credentials_is_refused_at_startup() -> None:
    output = _start_fails({"HERALD_CORS_ORIGINS": "*"})
    assert "HERALD_CORS_ORIGINS" in output


@pytest.mark.parametrize("name", ["HERALD_SECRET", "HERALD_JWT_SECRET"])
def test_16_a_short_secret_is_refused_at_startup(name: str) -> None:
    output = _start_fails({name: "short-secret-31-bytes-012345678"})
    assert name in output and "32" in output


def test_11_with_authentication_the_author_is_the_caller(herald: Callable[..., HeraldServer]) -> None:
    server = herald({"HERALD_JWT_SECRET": JWT_SECRET})
    with httpx.Client(base_url=server.url, timeout=5) as client:
        sent = client.post(SEND, json={"author": "bob", "text": "it was me"},
                           headers={**bearer("alice"), "Prefer": "wait=5"})
        assert sent.json()["status"] == "succeeded", sent.text
        assert sent.json()["result"]["author"] == "alice"
        message = sent.json()["result"]
        read = client.post(f"/chats/lobby/messages/{message['id']}/read", json={"reader": "carol"},
                           headers={**bearer("dave"), "Prefer": "wait=5"})
        assert read.json()["result"]["reader"] == "dave"


def test_16_pages_carry_a_content_security_policy(herald: Callable[..., HeraldServer]) -> None:
    server = herald()
    with httpx.Client(base_url=server.url, timeout=5) as client:
        for path in ("/", "/chat.js", "/herald.js"):
            response = client.get(path)
            assert response.status_code == 200, path
            assert "default-src 'self'" in response.headers["content-security-policy"], path
            assert response.headers["x-content-type-options"] == "nosniff", path
            assert response.headers["referrer-policy"] == "no-referrer", path



LEAKY_DOMAIN = '''
from herald import Context, Domain, Failed

leaky = Domain("leaky")


@leaky.command("POST", "/jobs", event="JobRequested",
               schema={"type": "object", "properties": {"fail": {"enum": ["crash", "failed"]}}})
def request(params, body):
    return body


@leaky.handler("JobRequested")
async def run(ctx: Context) -> None:
    if ctx.data.get("fail") == "failed":
        raise Failed("Quota exceeded", "you have used your 10 jobs for today", status=429)
    raise RuntimeError("cannot reach postgres://admin:hunter2@db.internal:5432/jobs")
'''


def test_16_a_handler_exception_stays_in_the_log_not_in_the_public_error(tmp_path: Path) -> None:
    (tmp_path / "leaky.py").write_text(LEAKY_DOMAIN)
    server = HeraldServer({"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}, target=("--domain", "leaky:leaky"))
    with server, httpx.Client(base_url=server.url, timeout=10) as client:
        crashed = client.post("/jobs", json={"fail": "crash"}, headers={"Prefer": "wait=5"}).json()
        failed = client.post("/jobs", json={"fail": "failed"}, headers={"Prefer": "wait=5"}).json()
        log = server.log()
    assert crashed["status"] == "failed"
    assert "hunter2" not in str(crashed) and "postgres" not in str(crashed) and "RuntimeError" not in str(crashed)
    assert crashed["error"]["status"] == 500
    assert "hunter2" in log and crashed["id"] in log  # the operator still has the whole story
    # a handler that means to tell the client raises Failed, and its words go out as they are
    assert (failed["status"], failed["error"]["title"]) == ("failed", "Quota exceeded")
    assert failed["error"]["detail"] == "you have used your 10 jobs for today"


def _slow_client(port: int, *, trickle: bool, budget: float = 6.0) -> tuple[bytes, float]:
    """Connect and send a request's headers a few bytes at a time (or nothing); what came back, and when."""
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=0.25) as sock:
        if trickle:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        while time.monotonic() - started < budget:
            if trickle:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    break
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - started


@pytest.mark.parametrize("trickle", [True, False], ids=["trickled-headers", "silent-connection"])
def test_13_a_slowloris_connection_is_cut_off_after_the_header_timeout(
    herald: Callable[..., HeraldServer], trickle: bool
) -> None:
    server = herald({"HERALD_HEADER_TIMEOUT": "1"})
    received, took = _slow_client(server.port, trickle=trickle)
    assert took < 4, f"held for {took:.1f}s"
    assert received.startswith(b"HTTP/1.1 408 "), received[:100]
    with httpx.Client(base_url=server.url, timeout=5) as client:
        assert client.get("/healthz").status_code == 200  # an ordinary request is not affected
        metrics = client.get("/metrics").text
    assert 'herald_limited_total{reason="header-timeout"} 1.0' in metrics


def test_3_a_room_named_events_is_no_way_around_bearer_auth(herald: Callable[..., HeraldServer]) -> None:
    """``GET /chats/events`` once skipped the bearer (its path ends in /events) and handed out a room token."""
    server = herald({"HERALD_JWT_SECRET": JWT_SECRET})
    with httpx.Client(base_url=server.url, timeout=5) as client:
        refused = client.get("/chats/events")
        assert refused.status_code == 401
        assert "token=" not in refused.text
        room = client.get("/chats/events", headers=bearer("alice"))
        assert room.status_code == 200 and "token=" in room.json()["subscribe_url"]
        # the push routes themselves still take subscribe tokens, not bearers
        stream = client.get("/topics/chats/events/events")
        assert stream.status_code == 401 and stream.json()["type"].endswith("/invalid-token")
