"""Limits, each with its setting and its answer: 413, 422, 400, WebSocket close codes, 503, 429."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Callable

import httpx
import orjson
import pytest
import websockets

from tests.support.server import HeraldServer
from tests.support.sse import sse_connect

pytestmark = pytest.mark.e2e

SEND = "/chats/lobby/messages"


def nested(depth: int) -> object:
    """A body nested ``depth`` levels deep (the outer object counts as one)."""
    doc: object = "leaf"
    for _ in range(depth - 1):
        doc = [doc]
    return {"author": "ann", "text": doc}


def assert_problem(response: httpx.Response, status: int, kind: str | None = None) -> dict[str, object]:
    """Assert a problem document of ``status`` (and ``type`` ending in ``kind``)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    doc = response.json()
    assert doc["status"] == status
    if kind is not None:
        assert str(doc["type"]).endswith("/" + kind), doc
    return doc


# Bodies ------------------------------------------------------------------------------------


async def test_json_nesting_and_string_sizes_are_422(herald: Callable[..., HeraldServer]) -> None:
    server = herald({"HERALD_MAX_JSON_DEPTH": "8", "HERALD_MAX_JSON_STRING": "100"})
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert_problem(await client.post(SEND, json=nested(9)), 422, "json-too-deep")
        assert_problem(await client.post(SEND, content=b"[" * 5000 + b"]" * 5000,
                                         headers={"content-type": "application/json"}), 422, "json-too-deep")
        assert_problem(await client.post(SEND, json={"author": "ann", "text": "x" * 101}), 422, "json-too-large")
        assert_problem(await client.post(SEND, json={"author": "ann", "text": "x", "k" * 101: 1}), 422,
                       "json-too-large")
        # at the limits: the shape passes, and the command's own validation answers
        assert_problem(await client.post(SEND, json=nested(8)), 422, "invalid-command")
        assert (await client.post(SEND, json={"author": "ann", "text": "x" * 100})).status_code == 202


def _raw_post(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head)
    return sock


def _status_after_endless_body(port: int, *, chunked: bool, budget: int = 8 * 1024 * 1024) -> tuple[bytes, int]:
    """Send an endless body, 16 kB at a time, until the server answers (or ``budget`` bytes); the answer and
    how much was sent before it came (each piece waits a moment for an answer, so kernel buffers do not count)."""
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: 1000000000\r\n"
    sock = _raw_post(port, b"POST " + SEND.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + framing + b"\r\n")
    piece = b"[" * 16384
    chunk = (b"%x\r\n" % len(piece) + piece + b"\r\n") if chunked else piece
    sent = 0
    answer = b""
    deadline = time.monotonic() + 10
    try:
        while sent < budget and time.monotonic() < deadline and not answer:
            if select.select([sock], [], [], 0.005)[0]:
                answer = sock.recv(65536)
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in answer:
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
    finally:
        sock.close()
    return answer, sent


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "huge-content-length"])
def test_an_endless_body_is_cut_off_early_with_413(herald: Callable[..., HeraldServer], chunked: bool) -> None:
    server = herald({"HERALD_MAX_BODY": "4096"})
    answer, sent = _status_after_endless_body(server.port, chunked=chunked)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"application/problem+json" in answer
    assert sent < 1024 * 1024, f"{sent} bytes went out before the refusal"
    assert httpx.get(server.url + "/healthz").status_code == 200


# Topics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/topics/" + "a" * 201 + "/events",
    "/topics/a/b/c/d/e/events",
    "/topics/chats/%2e%2e/events",
    "/topics/chats/a%00b/events",
    "/topics/chats/caf%C3%A9/events",
    "/topics/events?topic=chats/a&topic=chats/a",
    "/topics/events",
    "/topics/events?topic=",
    "/topics/events?topic=%20chats",
])
async def test_bad_topic_names_are_400_on_every_sse_path(herald: Callable[..., HeraldServer], path: str) -> None:
    server = herald()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert_problem(await client.get(path), 400)


# WebSocket ---------------------------------------------------------------------------------


async def test_subscriptions_per_socket_and_message_size_close_with_a_reason(
    herald: Callable[..., HeraldServer],
) -> None:
    server = herald({"HERALD_MAX_TOPICS": "2", "HERALD_MAX_WS_MESSAGE": "1024"})
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        tokens = [(await client.get(f"/chats/r{n}")).json()["websocket_url"].split("token=")[1] for n in range(3)]
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        for n in range(3):
            await ws.send(orjson.dumps({"type": "subscribe", "topic": f"chats/r{n}", "token": tokens[n]}).decode())
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
        assert ws.close_code == 1008
        assert "at most 2 topics" in (ws.close_reason or "")
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(orjson.dumps({"type": "ping", "id": "é" * 400}).decode())  # 800 bytes: allowed
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"
        await ws.send(orjson.dumps({"type": "ping", "id": "é" * 600}).decode())  # 600 characters, 1200 bytes
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1009
        assert "1024 bytes" in (ws.close_reason or "")


# Connections -------------------------------------------------------------------------------


async def test_connections_beyond_the_limit_are_503_with_retry_after(herald: Callable[..., HeraldServer]) -> None:
    server = herald({"HERALD_MAX_CONNECTIONS": "2"})
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        url = (await client.get("/chats/full")).json()["subscribe_url"]
        async with sse_connect(client, url) as one, sse_connect(client, url) as two:
            assert one.response.status_code == two.response.status_code == 200
            await one.next_block()
            await two.next_block()
            async with sse_connect(client, url) as three:
                await three.response.aread()
                assert_problem(three.response, 503, "too-many-connections")
                assert int(three.response.headers["retry-after"]) > 0
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(f"{server.ws_url}/ws"):
                    pass
            assert refused.value.response.status_code == 503
            assert int(refused.value.response.headers["retry-after"]) > 0
            # commands and reads are not connections: they still work
            assert (await client.post(SEND, json={"author": "a", "text": "b"})).status_code == 202
        for _ in range(50):  # the two streams are released on close
            async with sse_connect(client, url) as again:
                if again.response.status_code == 200:
                    break
            await asyncio.sleep(0.05)
        assert again.response.status_code == 200


# Rate limit --------------------------------------------------------------------------------


async def test_commands_over_the_rate_limit_are_429_with_retry_after(herald: Callable[..., HeraldServer]) -> None:
    server = herald({"HERALD_RATE_LIMIT": "3"})
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        answers = [await client.post(SEND, json={"author": "a", "text": str(n)}) for n in range(12)]
        metrics = (await client.get("/metrics")).text
    statuses = [a.status_code for a in answers]
    assert statuses.count(429) >= 6, statuses  # at most two windows of 3 fit in the burst
    assert f'herald_commands_rejected_total{{reason="rate-limited"}} {statuses.count(429)}.0' in metrics
    limited = next(a for a in answers if a.status_code == 429)
    assert_problem(limited, 429, "rate-limited")
    assert int(limited.headers["retry-after"]) == 1  # the window is one second


async def _burst_in_one_window(clients: list[httpx.AsyncClient], n: int) -> list[int] | None:
    """``n`` POSTs alternating over ``clients``, all inside one wall-clock second; ``None`` if it straddled two."""
    await asyncio.sleep(1 - time.time() % 1 + 0.02)  # start just after a window begins
    started = int(time.time())
    statuses = [(await clients[i % len(clients)].post(SEND, json={"author": "a", "text": str(i)})).status_code
                for i in range(n)]
    return statuses if int(time.time()) == started else None


@pytest.mark.redis
async def test_the_rate_limit_is_shared_by_gateway_processes_through_redis(
    herald: Callable[..., HeraldServer], redis_url: str,
) -> None:
    env = {"REDIS_URL": redis_url, "HERALD_RATE_LIMIT": "3"}
    first, second = herald(env), herald(env)
    async with httpx.AsyncClient(base_url=first.url, timeout=5) as a, httpx.AsyncClient(base_url=second.url,
                                                                                        timeout=5) as b:
        statuses = None
        for _ in range(3):  # bounded retries, in case a slow machine lets the burst straddle two seconds
            statuses = await _burst_in_one_window([a, b], 8)
            if statuses is not None:
                break
    assert statuses is not None, "no burst fitted in one second"
    # 3 for the client in this second, whichever process took them; a per-process count would allow 6
    assert statuses.count(202) == 3, statuses
    assert statuses.count(429) == 5, statuses
