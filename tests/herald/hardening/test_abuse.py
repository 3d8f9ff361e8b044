"""Abuse of the push endpoints (issue 13, findings 1, 4 and 10), each sent to a real Herald process.

* 1 — one WebSocket must not grow the gateway's memory without bound: a client that floods
  pings or commands and never reads is cut off, and the process's RSS (``VmRSS`` of the
  ``herald serve`` process) stays within :data:`RSS_BOUND` of what it was before the flood.
* 4 — connections are capped per process (a WebSocket from its accept, topics or not), per
  client, per subscribe token, and long polls have their own cap.
* 10 — ``/ws`` refuses a handshake from a foreign ``Origin``.

Every test failed on the code before the fix. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import base64
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
import websockets

from herald.auth import TokenSigner
from tests.herald.hardening.conftest import JWT_SECRET, bearer
from tests.support.server import TEST_SECRET, HeraldServer
from tests.support.sse import sse_connect

pytestmark = pytest.mark.e2e

SEND = "/chats/lobby/messages"
SIGNER = TokenSigner(TEST_SECRET)
RSS_BOUND = 20 * 1024 * 1024
"""How much a flood may grow the gateway's resident memory (before the fix: +37 MiB in 5 s of pings)."""
FLOOD_SECONDS = 5.0


# A WebSocket client by hand ------------------------------------------------------------------

def masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final client frame: masked, as RFC 6455 requires of a client."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, 0x80 | size])
    elif size < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", size)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawSocket:
    """A WebSocket client over a plain socket: it sends masked frames, and reads nothing until asked to."""

    def __init__(self, port: int, *, query: str = "") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET /ws{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          .encode())
        answer = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 101 "), answer[:300]
        self.unread = answer.partition(b"\r\n\r\n")[2]
        self.sock.setblocking(False)

    def flood(self, frame: bytes, seconds: float, *, every: float = 0.25,
              sample: Callable[[], None] = lambda: None, budget: int = 1 << 30) -> int:
        """Send ``frame`` again and again for ``seconds`` (or ``budget`` bytes), never reading; frames sent.

        Whole frames only: a send that the server does not take is retried from where it stopped.
        ``sample`` runs every ``every`` seconds meanwhile.
        """
        block = frame * max(1, 65536 // len(frame))
        sent = offset = 0
        deadline = next_sample = time.monotonic()
        deadline += seconds
        while (now := time.monotonic()) < deadline and sent < budget:
            if now >= next_sample:
                sample()
                next_sample = now + every
            if not select.select([], [self.sock], [], 0.05)[1]:
                continue  # the server is not reading (it stopped, or it is cutting us off)
            try:
                offset += self.sock.send(block[offset:])
            except BlockingIOError:
                continue
            except OSError:
                break  # the server closed the connection
            if offset == len(block):
                sent += len(block)
                offset = 0
        return sent // len(frame)

    def close_frame(self, timeout: float = 20.0, budget: int = 1 << 30) -> tuple[int, str] | None:
        """Read, dropping every message, up to the server's close frame: its code and reason (``None``: none came)."""
        buffer = self.unread
        read = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and read < budget:
            while len(buffer) >= 2:
                opcode, size, start = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
                if size == 126:
                    if len(buffer) < 4:
                        break
                    size, start = struct.unpack("!H", buffer[2:4])[0], 4
                elif size == 127:
                    if len(buffer) < 10:
                        break
                    size, start = struct.unpack("!Q", buffer[2:10])[0], 10
                if len(buffer) < start + size:
                    break
                payload, buffer = buffer[start:start + size], buffer[start + size:]
                if opcode == 0x8:
                    return struct.unpack("!H", payload[:2])[0], payload[2:].decode()
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            try:
                chunk = self.sock.recv(1 << 20)
            except (BlockingIOError, ConnectionResetError):
                continue
            if not chunk:
                return None
            read += len(chunk)
            buffer += chunk
        return None

    def close(self) -> None:
        """Drop the connection."""
        self.sock.close()


def rss(server: HeraldServer) -> int:
    """The resident memory of the gateway process, in bytes."""
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def limited(server: HeraldServer, reason: str) -> float:
    """``herald_limited_total{reason=…}`` as the process reports it now."""
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    prefix = f'herald_limited_total{{reason="{reason}"}} '
    return float(next(line for line in metrics.splitlines() if line.startswith(prefix))[len(prefix):])


def gauge(server: HeraldServer, transport: str) -> float:
    """``herald_connections{transport=…}`` now."""
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    prefix = f'herald_connections{{transport="{transport}"}} '
    return float(next(line for line in metrics.splitlines() if line.startswith(prefix))[len(prefix):])


async def refused_stream(client: httpx.AsyncClient, url: str, **headers: str) -> httpx.Response:
    """Open ``url`` as an SSE stream that must be refused; the refusal, read whole."""
    async with sse_connect(client, url, headers=headers) as stream:
        assert stream.response.status_code != 200, f"{url} was not refused"
        async with asyncio.timeout(5):
            await stream.response.aread()
        return stream.response


def assert_refused(refusal: httpx.Response | websockets.InvalidStatus, status: int, kind: str) -> None:
    """Assert a problem of ``status`` whose type ends in ``kind``, with ``Retry-After`` (an SSE or a handshake)."""
    if isinstance(refusal, websockets.InvalidStatus):
        code, body = refusal.response.status_code, refusal.response.body or b""
        content_type, retry_after = refusal.response.headers["content-type"], refusal.response.headers["retry-after"]
    else:
        code, body = refusal.status_code, refusal.content
        content_type, retry_after = refusal.headers["content-type"], refusal.headers["retry-after"]
    assert code == status, body
    assert content_type == "application/problem+json"
    assert int(retry_after) > 0
    assert orjson.loads(body)["type"].endswith("/" + kind), body


def warmed_up(server: HeraldServer) -> int:
    """The gateway's RSS once one ordinary socket has pinged and one command was sent (lazy imports done)."""
    async def once() -> None:
        async with websockets.connect(f"{server.ws_url}/ws") as ws:
            await ws.send('{"type": "ping", "id": 1}')
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"
            await ws.send(orjson.dumps(command(1, wait=0)).decode())
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] in ("operation", "error")

    asyncio.run(once())
    return rss(server)


def command(ref: int, *, wait: int) -> dict[str, object]:
    """A WebSocket ``command`` frame posting a chat message, waiting up to ``wait`` seconds for its end."""
    return {"type": "command", "id": ref, "method": "POST", "path": SEND, "body": {"author": "a", "text": "flood"},
            "headers": {"prefer": f"wait={wait}"}}


# Finding 1: one WebSocket's memory ---------------------------------------------------------

def _flood_and_measure(server: HeraldServer, frame: bytes) -> tuple[int, int, tuple[int, str] | None]:
    """Flood ``frame`` over a socket that never reads: frames sent, peak RSS growth, and the close frame."""
    baseline = warmed_up(server)
    peak = baseline

    def sample() -> None:
        nonlocal peak
        peak = max(peak, rss(server))

    raw = RawSocket(server.port)
    try:
        sent = raw.flood(frame, FLOOD_SECONDS, sample=sample)
        sample()
        closed = raw.close_frame()
        sample()  # what the gateway took in but had not handled yet counts too
    finally:
        raw.close()
    return sent, peak - baseline, closed


def test_1_a_ping_flood_that_never_reads_is_cut_off_as_slow_and_memory_stays_bounded(
    herald: Callable[..., HeraldServer],
) -> None:
    # no message rate limit: the queue bound alone must hold the pongs nobody reads
    server = herald({"HERALD_WS_RATE": "0"})
    ping = masked(orjson.dumps({"type": "ping", "id": "p" * 1000}))
    sent, growth, closed = _flood_and_measure(server, ping)
    assert sent > 2000, f"only {sent} pings went out: the flood did not test anything"
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB with {sent} pings"
    assert closed is not None, "the socket was never closed"
    assert closed[0] == 4008, closed  # slow consumer: reconnect with the cursor, nothing is lost
    assert limited(server, "ws-queue-overflow") >= 1


def test_1_a_command_flood_that_never_reads_is_capped_in_flight_and_cut_off(
    herald: Callable[..., HeraldServer],
) -> None:
    # no worker: every accepted command waits (Prefer: wait) in flight for as long as the flood lasts
    server = herald({"HERALD_WS_RATE": "0", "HERALD_EMBEDDED_WORKER": "0"})
    frames = b"".join(masked(orjson.dumps(command(n, wait=30))) for n in range(64))
    sent, growth, closed = _flood_and_measure(server, frames)
    assert sent * 64 > 2000, f"only {sent * 64} commands went out"
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB with {sent * 64} commands"
    assert closed is not None and closed[0] == 4008, closed
    assert limited(server, "ws-commands-inflight") >= 1
    assert limited(server, "ws-queue-overflow") >= 1


def test_1_messages_beyond_the_rate_close_the_socket_1008(herald: Callable[..., HeraldServer]) -> None:
    server = herald({"HERALD_WS_RATE": "50"})
    ping = masked(b'{"type": "ping", "id": 1}')
    sent, growth, closed = _flood_and_measure(server, ping)
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB with {sent} pings"
    assert closed is not None, "the socket was never closed"
    code, reason = closed
    assert code == 1008, closed
    assert "50 messages per second" in reason, reason
    assert limited(server, "ws-message-rate") == 1


async def test_1_a_burst_within_the_rate_is_served(herald: Callable[..., HeraldServer]) -> None:
    server = herald({"HERALD_WS_RATE": "50"})  # a burst of 100
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        for n in range(80):
            await ws.send(orjson.dumps({"type": "ping", "id": n}).decode())
        replies = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(80)]
    assert [r["id"] for r in replies] == list(range(80))
    assert limited(server, "ws-message-rate") == 0


async def test_1_commands_beyond_the_in_flight_cap_get_a_429_error_and_no_task(
    herald: Callable[..., HeraldServer],
) -> None:
    server = herald({"HERALD_WS_MAX_INFLIGHT": "4", "HERALD_EMBEDDED_WORKER": "0", "HERALD_MAX_WAIT": "2"})
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        for n in range(6):
            await ws.send(orjson.dumps(command(n, wait=2)).decode())
        refused = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(2)]
        assert [(r["type"], r["id"], r["code"], r["status"]) for r in refused] == [
            ("error", 4, "too-many-commands", 429), ("error", 5, "too-many-commands", 429)]
        waited = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(4)]
        assert sorted(r["id"] for r in waited) == [0, 1, 2, 3]
        assert {(r["type"], r["status"]) for r in waited} == {("operation", 202)}
        # once they are answered, the socket takes commands again
        await ws.send(orjson.dumps(command(9, wait=0)).decode())
        again = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        assert (again["type"], again["id"]) == ("operation", 9)
    assert limited(server, "ws-commands-inflight") == 2


# Finding 4: connection caps ----------------------------------------------------------------

async def test_4_websockets_without_topics_count_against_the_process_cap(
    herald: Callable[..., HeraldServer],
) -> None:
    server = herald({"HERALD_MAX_CONNECTIONS": "3"})
    async with websockets.connect(f"{server.ws_url}/ws") as a, websockets.connect(f"{server.ws_url}/ws") as b, \
            websockets.connect(f"{server.ws_url}/ws") as c:
        for ws in (a, b, c):  # each is served
            await ws.send('{"type": "ping", "id": 1}')
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"
        assert gauge(server, "ws") == 3
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(f"{server.ws_url}/ws"):
                pass
        assert refused.value.response.status_code == 503
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
            url = (await client.get("/chats/lobby")).json()["subscribe_url"]
            assert_refused(await refused_stream(client, url), 503, "too-many-connections")
    assert limited(server, "connections-process") == 2
    for _ in range(50):  # released on close
        if gauge(server, "ws") == 0:
            break
        await asyncio.sleep(0.05)
    assert gauge(server, "ws") == 0


async def test_4_one_client_gets_its_share_of_connections_not_the_whole_pool(
    herald: Callable[..., HeraldServer],
) -> None:
    server = herald({"HERALD_MAX_CONNECTIONS_PER_CLIENT": "3"})
    tokens = [SIGNER.issue([f"chats/r{n}"]) for n in range(5)]
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        async with sse_connect(client, f"/topics/chats/r0/events?token={tokens[0]}") as one, \
                sse_connect(client, f"/topics/chats/r1/events?token={tokens[1]}") as two, \
                websockets.connect(f"{server.ws_url}/ws?topic=chats/r2&token={tokens[2]}") as three:
            assert one.response.status_code == two.response.status_code == 200
            assert orjson.loads(await asyncio.wait_for(three.recv(), 5))["type"] == "subscribed"
            assert_refused(await refused_stream(client, f"/topics/chats/r3/events?token={tokens[3]}"), 429,
                     "too-many-connections")
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(f"{server.ws_url}/ws"):
                    pass
            assert_refused(refused.value, 429, "too-many-connections")
        # released on close: the client may connect again
        for _ in range(50):
            async with sse_connect(client, f"/topics/chats/r4/events?token={tokens[4]}") as again:
                if again.response.status_code == 200:
                    break
            await asyncio.sleep(0.05)
        assert again.response.status_code == 200
    assert limited(server, "connections-client") == 2


async def test_4_with_bearer_auth_the_client_is_its_subject(herald: Callable[..., HeraldServer]) -> None:
    server = herald({"HERALD_JWT_SECRET": JWT_SECRET, "HERALD_MAX_CONNECTIONS_PER_CLIENT": "1"})
    token = SIGNER.issue(["chats/lobby"])
    url = f"/topics/chats/lobby/events?token={token}"
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        async with sse_connect(client, url, headers=bearer("alice")) as alice:
            assert alice.response.status_code == 200
            assert_refused(await refused_stream(client, url, **bearer("alice")), 429, "too-many-connections")
            # the same address, another subject (or none): not alice's share
            async with sse_connect(client, url, headers=bearer("bob")) as bob, sse_connect(client, url) as anonymous:
                assert bob.response.status_code == anonymous.response.status_code == 200


async def test_4_one_subscribe_token_opens_a_bounded_number_of_connections(
    herald: Callable[..., HeraldServer],
) -> None:
    server = herald({"HERALD_MAX_CONNECTIONS_PER_TOKEN": "2"})
    token = SIGNER.issue(["chats/lobby"])
    url = f"/topics/chats/lobby/events?token={token}"
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        async with sse_connect(client, url) as one, websockets.connect(
                f"{server.ws_url}/ws?topic=chats/lobby&token={token}") as two:
            assert one.response.status_code == 200
            assert orjson.loads(await asyncio.wait_for(two.recv(), 5))["type"] == "subscribed"
            assert_refused(await refused_stream(client, url), 429, "too-many-connections")
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(f"{server.ws_url}/ws?topic=chats/lobby&token={token}"):
                    pass
            assert_refused(refused.value, 429, "too-many-connections")
            other = SIGNER.issue(["chats/lobby"], ttl=600)  # another token for the same topic
            async with sse_connect(client, f"/topics/chats/lobby/events?token={other}") as fresh:
                assert fresh.response.status_code == 200
    assert limited(server, "connections-token") == 2


async def test_4_long_polls_have_their_own_cap_and_beyond_it_are_answered_at_once(
    herald: Callable[..., HeraldServer],
) -> None:
    # no worker: every operation stays pending, so every wait lasts its full length
    server = herald({"HERALD_MAX_LONG_POLLS": "2", "HERALD_EMBEDDED_WORKER": "0", "HERALD_MAX_WAIT": "4"})
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        op = (await client.post(SEND, json={"author": "a", "text": "x"})).json()["id"]
        holding = [asyncio.ensure_future(client.post(SEND, json={"author": "a", "text": str(n)},
                                                     headers={"Prefer": "wait=4"})) for n in range(2)]
        for _ in range(100):  # both waits have started
            if gauge(server, "wait") == 2:
                break
            await asyncio.sleep(0.02)
        assert gauge(server, "wait") == 2
        started = time.monotonic()
        refused = await client.post(SEND, json={"author": "a", "text": "late"}, headers={"Prefer": "wait=4"})
        polled = await client.get(f"/operations/{op}", params={"wait": "4"})
        assert time.monotonic() - started < 2, "a long poll beyond the cap waited"
        assert refused.status_code == 202 and "preference-applied" not in refused.headers
        assert polled.status_code == 200 and polled.json()["status"] == "pending"
        # a stream is not a long poll: the cap on waits leaves it alone
        async with sse_connect(client, (await client.get("/chats/lobby")).json()["subscribe_url"]) as stream:
            assert stream.response.status_code == 200
        held = await asyncio.gather(*holding)
        assert [r.headers.get("preference-applied") for r in held] == ["wait=4", "wait=4"]
    assert limited(server, "long-polls") == 2


# Finding 10: the WebSocket's Origin --------------------------------------------------------

async def test_10_the_websocket_refuses_a_foreign_origin(herald: Callable[..., HeraldServer]) -> None:
    """A page on another site must not open ``/ws`` in its visitor's name.

    A browser sends the page's ``Origin`` with every WebSocket handshake, and its cookies too:
    before this check, a page on a sibling site opened ``/ws`` with the visitor's ``herald_token``
    cookie (cross-site WebSocket hijacking). Now only the gateway's own origin (``Origin`` naming
    the request's ``Host``, http for ws and https for wss) and the ``HERALD_CORS_ORIGINS`` may, so a
    cross-site page can no longer use the ``HttpOnly`` cookie over the WebSocket. A handshake
    without ``Origin`` (curl, the websockets library, a worker) is no browser's and is let through.
    """
    server = herald({"HERALD_CORS_ORIGINS": "https://app.example"})
    token = SIGNER.issue(["chats/lobby"])
    cookie = {"Cookie": f"herald_token={token}"}
    for origin in ("https://evil.example", "http://127.0.0.1.evil.example", f"https://127.0.0.1:{server.port}",
                   "null", "https://app.example.evil.example"):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(f"{server.ws_url}/ws?topic=chats/lobby", origin=origin,  # type: ignore[arg-type]
                                          additional_headers=cookie):
                pass
        response = refused.value.response
        assert response.status_code == 403, origin
        assert response.headers["content-type"] == "application/problem+json"
        assert orjson.loads(response.body or b"")["type"].endswith("/forbidden-origin")
    for allowed in (f"http://127.0.0.1:{server.port}", "https://app.example", None):
        async with websockets.connect(f"{server.ws_url}/ws?topic=chats/lobby", origin=allowed,  # type: ignore[arg-type]
                                      additional_headers=cookie) as ws:
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "subscribed", allowed
