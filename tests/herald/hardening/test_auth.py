"""Authorization: bearer JWTs on commands and reads, owners, topic tokens, the cookie, CORS."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import jwt
import orjson
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from herald.http.security import BearerError, BearerVerifier
from tests.herald.hardening.conftest import JWT_SECRET, bearer
from tests.support.server import HeraldServer
from tests.support.sse import sse_connect

pytestmark = pytest.mark.e2e

SEND = "/chats/lobby/messages"
MESSAGE = {"author": "ann", "text": "hello"}
ORIGIN = "https://chat.example"


@pytest.fixture(scope="module")
def server() -> Iterator[HeraldServer]:
    """One gateway with HS256 bearer authentication and CORS for one origin."""
    with HeraldServer({"HERALD_JWT_SECRET": JWT_SECRET, "HERALD_CORS_ORIGINS": ORIGIN}) as gateway:
        yield gateway


@pytest.fixture
async def client(server: HeraldServer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the module's gateway."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        yield c


# made at import, which can be many minutes before these tests run in a full session: valid for an hour
ALICE = bearer("alice", ttl=3600)
BOB = bearer("bob", ttl=3600)


async def send(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    """POST the chat message with ``headers``."""
    return await client.post(SEND, json=MESSAGE, headers=headers)


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    """Assert ``response`` is a problem document of ``status``; return it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    doc = response.json()
    assert doc["status"] == status and doc["title"] and doc["detail"]
    return doc


# Bearer tokens ---------------------------------------------------------------------------


async def test_a_command_without_a_bearer_token_is_401_with_a_challenge(client: httpx.AsyncClient) -> None:
    response = await send(client, {})
    assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith('Bearer realm="herald"')


@pytest.mark.parametrize("headers", [
    pytest.param(bearer("alice", ttl=-120), id="expired"),
    pytest.param(bearer("alice", secret="another-secret-0123456789abcdef-xyz"), id="wrong-key"),
    pytest.param({"Authorization": "Bearer " + jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None,
                                                          algorithm="none")}, id="alg-none"),
    pytest.param({"Authorization": "Bearer not.a.jwt"}, id="garbage"),
    pytest.param({"Authorization": "Basic YWxpY2U6cHc="}, id="basic-scheme"),
    pytest.param({"Authorization": "Bearer " + jwt.encode({"exp": int(time.time()) + 60}, JWT_SECRET)}, id="no-sub"),
    pytest.param({"Authorization": "Bearer " + "x" * 9000}, id="oversized"),
])
async def test_a_bad_bearer_token_is_401_invalid_token(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await send(client, headers)
    assert_problem(response, 401)
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_the_subject_owns_its_operation_and_others_get_404(client: httpx.AsyncClient) -> None:
    accepted = await send(client, ALICE)
    assert accepted.status_code == 202
    url = accepted.json()["operation_url"]
    assert (await client.get(url, params={"view": "status"}, headers=ALICE)).status_code == 200
    assert_problem(await client.get(url, params={"view": "status"}, headers=BOB), 404)
    assert_problem(await client.delete(url, headers=BOB), 404)
    assert_problem(await client.get(url), 401)
    token = accepted.json()["subscribe_url"].split("token=")[1]
    assert jwt.decode(token, options={"verify_signature": False})["sub"] == "alice"


async def test_another_subject_cannot_subscribe_to_an_operation(client: httpx.AsyncClient) -> None:
    accepted = (await send(client, ALICE)).json()
    async with sse_connect(client, accepted["subscribe_url"], headers=ALICE) as stream:
        assert stream.response.status_code == 200
    # alice's token presented by bob (a leaked URL): the token is valid, the caller is not the owner
    async with sse_connect(client, accepted["subscribe_url"], headers=BOB) as stream:
        assert stream.response.status_code == 403
    # bob's own token cannot name alice's operation
    bobs = (await send(client, BOB)).json()
    bob_token = bobs["subscribe_url"].split("token=")[1]
    async with sse_connect(client, f"{accepted['operation_url']}/events?token={bob_token}") as stream:
        assert stream.response.status_code == 403
    async with sse_connect(client, f"/topics/events?topic=operations/{accepted['id']}&token={bob_token}") as stream:
        assert stream.response.status_code == 403


async def test_a_websocket_of_another_subject_is_refused_the_operation(server: HeraldServer,
                                                                     client: httpx.AsyncClient) -> None:
    accepted = (await send(client, ALICE)).json()
    token = accepted["subscribe_url"].split("token=")[1]
    async with websockets.connect(f"{server.ws_url}/ws", additional_headers=BOB) as ws:
        await ws.send(orjson.dumps({"type": "subscribe", "topic": f"operations/{accepted['id']}", "token": token,
                                    "id": 1}).decode())
        reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    assert reply["type"] == "error" and reply["status"] == 403


async def test_websocket_commands_need_the_bearer_at_the_handshake(server: HeraldServer) -> None:
    command = {"type": "command", "id": 7, "method": "POST", "path": SEND, "body": MESSAGE}
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(orjson.dumps(command).decode())
        reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["type"] == "error" and reply["status"] == 401
    async with websockets.connect(f"{server.ws_url}/ws", additional_headers=ALICE) as ws:
        await ws.send(orjson.dumps(command).decode())
        reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["type"] == "operation"
        token = reply["operation"]["subscribe_url"].split("token=")[1]
        assert jwt.decode(token, options={"verify_signature": False})["sub"] == "alice"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"{server.ws_url}/ws", additional_headers=bearer("x", ttl=-100)):
            pass
    assert refused.value.response.status_code == 401
    assert orjson.loads(refused.value.response.body)["status"] == 401


# Topic tokens ----------------------------------------------------------------------------


async def test_room_tokens_go_only_to_authenticated_callers_and_open_only_their_room(
    client: httpx.AsyncClient,
) -> None:
    assert_problem(await client.get("/chats/lobby"), 401)
    room = (await client.get("/chats/lobby", headers=ALICE)).json()
    claims = jwt.decode(room["subscribe_url"].split("token=")[1], options={"verify_signature": False})
    assert claims["topics"] == ["chats/lobby"] and claims["sub"] == "alice"
    async with sse_connect(client, room["subscribe_url"]) as stream:
        assert stream.response.status_code == 200
    token = room["subscribe_url"].split("token=")[1]
    async with sse_connect(client, f"/topics/chats/other/events?token={token}") as stream:
        assert stream.response.status_code == 403
    async with sse_connect(client, "/topics/chats/lobby/events") as stream:
        assert stream.response.status_code == 401


# The cookie ------------------------------------------------------------------------------


async def test_a_subscribe_token_works_as_an_httponly_cookie(client: httpx.AsyncClient) -> None:
    room = (await client.get("/chats/lobby", headers=ALICE)).json()
    token = room["subscribe_url"].split("token=")[1]
    response = await client.post("/session/cookie", json={"token": token})
    assert response.status_code == 200
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"herald_token={token};")
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
    assert response.json()["topics"] == ["chats/lobby"]
    async with sse_connect(client, "/topics/chats/lobby/events") as stream:  # the client sends the cookie
        assert stream.response.status_code == 200
    cleared = await client.delete("/session/cookie")
    assert cleared.status_code == 204 and 'herald_token=""' in cleared.headers["set-cookie"]
    client.cookies.clear()
    async with sse_connect(client, "/topics/chats/lobby/events") as stream:
        assert stream.response.status_code == 401


async def test_the_cookie_endpoint_refuses_forged_tokens_and_other_bodies(client: httpx.AsyncClient) -> None:
    assert_problem(await client.post("/session/cookie", json={"token": "forged.token.value"}), 401)
    assert_problem(await client.post("/session/cookie", json={"token": 1}), 422)
    assert_problem(await client.post("/session/cookie", json={"token": "a", "extra": 1}), 422)
    assert_problem(await client.post("/session/cookie", content=b"token=x",
                                     headers={"content-type": "application/x-www-form-urlencoded"}), 415)


# CORS ------------------------------------------------------------------------------------


async def test_cors_allows_the_configured_origin_only(client: httpx.AsyncClient) -> None:
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"}
    allowed = await client.options(SEND, headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200  # answered without a bearer token
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    refused = await client.options(SEND, headers={"Origin": "https://evil.example", **preflight})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    simple = await client.get("/healthz", headers={"Origin": ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "location" in simple.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-origin" not in (await client.get("/healthz", headers={"Origin": "https://x.example"})
                                                 ).headers


async def test_without_cors_origins_no_cors_headers_are_sent(herald: Callable[..., HeraldServer]) -> None:
    plain = herald()
    async with httpx.AsyncClient(base_url=plain.url, timeout=10) as client:
        response = await client.get("/healthz", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers


# Anonymous mode and public keys ----------------------------------------------------------


async def test_anonymous_mode_needs_no_token_and_records_no_owner(herald: Callable[..., HeraldServer]) -> None:
    plain = herald()
    async with httpx.AsyncClient(base_url=plain.url, timeout=10) as client:
        accepted = await send(client, {})
        assert accepted.status_code == 202
        token = accepted.json()["subscribe_url"].split("token=")[1]
        assert "sub" not in jwt.decode(token, options={"verify_signature": False})
        assert (await client.get(accepted.json()["operation_url"], params={"view": "status"})).status_code == 200


def hs256_by_hand(claims: dict[str, object], key: bytes) -> str:
    """An HS256 JWT signed with any bytes (PyJWT refuses a PEM key as an HMAC secret, as an attacker would not)."""
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing_input = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"})) + b"." + b64(orjson.dumps(claims))
    return (signing_input + b"." + b64(hmac.new(key, signing_input, hashlib.sha256).digest())).decode()


def _pem(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo).decode()


async def test_rs256_tokens_verify_against_the_public_key_in_a_real_gateway(
    herald: Callable[..., HeraldServer],
) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    gateway = herald({"HERALD_JWT_PUBLIC_KEY": _pem(private), "HERALD_JWT_AUDIENCE": "herald-api"})
    now = int(time.time())
    good = jwt.encode({"sub": "carol", "aud": "herald-api", "exp": now + 60}, private, algorithm="RS256")
    wrong_aud = jwt.encode({"sub": "carol", "aud": "other", "exp": now + 60}, private, algorithm="RS256")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        ok = await client.post(SEND, json=MESSAGE, headers={"Authorization": f"Bearer {good}"})
        assert ok.status_code == 202
        assert_problem(await client.post(SEND, json=MESSAGE, headers={"Authorization": f"Bearer {wrong_aud}"}), 401)
        # algorithm confusion: the public key used as an HMAC secret must not verify
        confused = hs256_by_hand({"sub": "carol", "aud": "herald-api", "exp": now + 60}, _pem(private).encode())
        assert_problem(await client.post(SEND, json=MESSAGE, headers={"Authorization": f"Bearer {confused}"}), 401)


def test_es256_tokens_verify_and_other_curves_keys_do_not() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    verifier = BearerVerifier(public_key=_pem(private), issuer="https://idp.example")
    now = int(time.time())
    token = jwt.encode({"sub": "dan", "iss": "https://idp.example", "exp": now + 60}, private, algorithm="ES256")
    assert verifier.subject(token) == "dan"
    stranger = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(BearerError):
        verifier.subject(jwt.encode({"sub": "dan", "iss": "https://idp.example", "exp": now + 60}, stranger,
                                    algorithm="ES256"))
    with pytest.raises(BearerError):
        verifier.subject(jwt.encode({"sub": "dan", "iss": "https://evil.example", "exp": now + 60}, private,
                                    algorithm="ES256"))
    with pytest.raises(BearerError):
        verifier.subject(jwt.encode({"sub": "dan\n", "iss": "https://idp.example", "exp": now + 60}, private,
                                    algorithm="ES256"))
