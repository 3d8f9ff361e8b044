"""Graceful shutdown: refuse new work, hand clients to another process without a gap, end within a bound.

(tests/herald/e2e/test_shutdown.py shows the notices themselves: ``herald.disconnect`` and close 4001.)
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable

import httpx
import orjson
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse

from app.main import create_app
from herald.settings import Settings
from tests.support.server import TEST_SECRET, HeraldServer
from tests.support.sse import sse_connect

pytestmark = pytest.mark.e2e


def test_a_draining_gateway_refuses_commands_and_connections_with_503_and_retry_after() -> None:
    app = create_app(Settings(secret=TEST_SECRET))
    with TestClient(app) as client:
        room = client.get("/chats/drain").json()
        app.state.gateway.accepting = False  # what the SIGTERM handler does first
        answers = {
            "command": client.post("/chats/drain/messages", json={"author": "a", "text": "b"}),
            "sse": client.get(room["subscribe_url"]),
            "readyz": client.get("/readyz"),
        }
        for name, response in answers.items():
            assert response.status_code == 503, name
            assert response.headers["content-type"] == "application/problem+json", name
            assert int(response.headers["retry-after"]) >= 1, name
            assert response.json()["type"].endswith("/shutting-down"), name
        with pytest.raises(WebSocketDenialResponse) as refused, client.websocket_connect("/ws"):
            pass
        assert refused.value.status_code == 503
        assert client.get("/healthz").status_code == 200  # alive, just not taking work


def _silent_sse(port: int, path: str) -> socket.socket:
    """An SSE request from a client that will never read its answer (a tiny receive buffer fills at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    return sock


async def test_a_client_that_stopped_reading_cannot_hold_shutdown_beyond_the_bound(
    herald: Callable[..., HeraldServer],
) -> None:
    # the Procfile's bound (10 s there): uvicorn stops waiting for connections that will not finish
    server = herald({"HERALD_QUEUE_SIZE": "100000", "HERALD_SLOW_CLIENT_GRACE": "600"},
                    uvicorn_args=("--timeout-graceful-shutdown", "2"))
    assert server.process is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        room = (await client.get("/chats/stuck")).json()
        sock = _silent_sse(server.port, room["subscribe_url"])
        try:
            text = "\U0001f600" * 2000  # 8 kB of UTF-8 per message
            for _ in range(20):  # 20 x 50 x 8 kB: far more than the socket buffers hold
                await asyncio.gather(*(client.post("/chats/stuck/messages", json={"author": "a", "text": text})
                                       for _ in range(50)))
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.process.wait, 20)
            took = time.monotonic() - started
        finally:
            sock.close()
    assert code == -signal.SIGTERM
    assert took < 2 + 5, f"shutdown took {took:.1f}s"
    assert "timeout graceful shutdown exceeded" in server.log()


@pytest.mark.redis
async def test_an_sse_client_resumes_on_another_gateway_without_a_gap_and_no_accepted_operation_is_lost(
    herald: Callable[..., HeraldServer], redis_url: str,
) -> None:
    # A only serves; B also runs the chat worker, so work A accepted is finished after A is gone
    a = herald({"REDIS_URL": redis_url, "HERALD_EMBEDDED_WORKER": "0"})
    b = herald({"REDIS_URL": redis_url, "HERALD_EMBEDDED_WORKER": "1"})
    assert a.process is not None
    accepted_by_a: list[str] = []
    texts: list[str] = []
    async with httpx.AsyncClient(timeout=10) as client:
        room = (await client.get(f"{a.url}/chats/failover")).json()
        token = room["subscribe_url"].split("token=")[1]

        async def post(base: str, n: int) -> None:
            try:
                response = await client.post(f"{base}/chats/failover/messages", json={"author": "a", "text": f"m{n}"})
            except httpx.TransportError:
                return  # A stopped listening: nothing was accepted
            if response.status_code == 202:
                texts.append(f"m{n}")
                if base == a.url:
                    accepted_by_a.append(response.json()["id"])
            else:
                assert response.status_code == 503 and response.headers["retry-after"], response.text

        received: list[str] = []
        async with sse_connect(client, f"{a.url}/topics/chats/failover/events?token={token}") as stream:
            await stream.next_block()  # retry: — following live from here
            for n in range(10):
                await post(a.url, n)
            async with asyncio.timeout(10):
                while len(received) < 10:
                    message = await stream.next_message()
                    received.append(orjson.loads(message.data or "{}")["data"]["text"])
            a.process.send_signal(signal.SIGTERM)
            for n in range(10, 14):  # A may still be draining: accepted (finished by B's worker) or 503
                await post(a.url, n)
            notice = await stream.next_message()
            while notice.event != "herald.disconnect":  # messages accepted by A while it drained
                received.append(orjson.loads(notice.data or "{}")["data"]["text"])
                notice = await stream.next_message()
        assert notice.json()["reason"] == "shutdown" and notice.json()["reconnect"] is True
        cursor = notice.json()["cursor"]
        for n in range(14, 24):  # sent to B while the client is between gateways
            await post(b.url, n)
        headers = {"Last-Event-ID": cursor}
        async with sse_connect(client, f"{b.url}/topics/chats/failover/events?token={token}",
                               headers=headers) as stream:
            async with asyncio.timeout(15):
                while len(received) < len(texts):
                    message = await stream.next_message()
                    assert message.event == "ChatMessageDelivered", message
                    received.append(orjson.loads(message.data or "{}")["data"]["text"])
        assert await asyncio.to_thread(a.process.wait, 10) == -signal.SIGTERM
        for op_id in accepted_by_a:
            status = (await client.get(f"{b.url}/operations/{op_id}", params={"view": "status", "wait": "5"})).json()
            for _ in range(20):
                if status["status"] == "succeeded":
                    break
                status = (await client.get(f"{b.url}/operations/{op_id}",
                                           params={"view": "status", "wait": "1"})).json()
            assert status["status"] == "succeeded", status
    # every accepted message exactly once: no gap across the switch, no repeat (concurrent workers may reorder)
    assert sorted(received) == sorted(texts)
    assert len(set(received)) == len(received)
    assert len(accepted_by_a) >= 10
